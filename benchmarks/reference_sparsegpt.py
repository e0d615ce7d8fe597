"""The reference SparseGPT solve, written out once for the benchmark and the tests to compare against.

This is the math of `SparseGPT.fasterprune` in IST-DASLab/sparsegpt (`sparsegpt.py`, without
quantization), kept as close to its loop as plain PyTorch allows; it is a yardstick, not part of
the package. `benchmarks/oneshot.py` times `sparsegpt_prune` against it, and
`tests/test_oneshot.py` checks that `sparsegpt_prune` gives the same weights.
"""

from __future__ import annotations

import torch


def reference_sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    exact_count: bool = False,
) -> torch.Tensor:
    """The reference `fasterprune` on an (out, in) weight `W` and Hessian `H`; returns the pruned weight.

    Unstructured (`prunen` = 0): each block prunes the entries whose score w²/[H⁻¹]_jj² is at most
    the block's sorted score at index k = int(numel·sparsity). That is the reference's own threshold,
    `sort(tmp.flatten())[0][k]` with `<=`, which prunes k + 1 entries per block (more on ties);
    `exact_count=True` takes index k − 1 instead, pruning exactly k (what `sparsegpt_prune` does).
    N:M (`prunen` = M − N of every `prunem`): per row, the `prunen` lowest scores of each group,
    chosen when the sweep reaches the group's first column.
    """
    W, H = W.clone().float(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if prunen == 0:
            tmp = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            index = int(tmp.numel() * sparsity) - (1 if exact_count else 0)
            mask1 = tmp <= torch.sort(tmp.flatten())[0][index]
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / torch.diag(Hinv1)[i : i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W
