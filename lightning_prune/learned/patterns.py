"""Candidate N:M patterns, logits over them, soft (Gumbel-softmax) and hard (argmax) masks (MaskLLM).

MaskLLM (Fang et al., NeurIPS 2024, section 3): every group of M consecutive weights along the input
dimension holds one logit per candidate pattern, the C(M, N) ways to keep N of M. Training samples
`softmax((κ·logits + g)/τ) @ P` (Gumbel noise g, logit scale κ, temperature τ, the candidate
patterns P as rows of 0/1); evaluation and the final mask take the argmax pattern.

Shapes: a weight viewed as a matrix (..., rows, cols) has logits (..., rows, cols/M, C); masks come
back in the matrix shape. Pure PyTorch: no Lightning, no I/O.
"""

from __future__ import annotations

import itertools
import math

import torch

from lightning_prune.selection import parse_pattern

MAX_CANDIDATES = 70  # C(8, 4): 4:8 is the largest pattern learned by default (35 bytes of fp32 logits per weight)
ADAM_STATES = 2  # AdamW keeps two moments per logit, in the logits' dtype


def candidate_count(pattern: str) -> int:
    """C(M, N): the number of ways to keep N of M weights (6 for 2:4, 70 for 4:8)."""
    n, m = parse_pattern(pattern)
    return math.comb(m, n)


def bytes_per_weight(pattern: str, dtype: torch.dtype = torch.float32, optimizer_states: int = ADAM_STATES) -> float:
    """Memory the logits and their optimizer state take per pruned weight: C(M, N)/M values, times (1 + states)."""
    _, m = parse_pattern(pattern)
    return candidate_count(pattern) / m * dtype.itemsize * (1 + optimizer_states)


def check_candidates(pattern: str, max_candidates: int = MAX_CANDIDATES) -> int:
    """Raise a ValueError naming the memory when `pattern` has more than `max_candidates` candidates."""
    count = candidate_count(pattern)
    if count > max_candidates:
        per_weight = bytes_per_weight(pattern)
        raise ValueError(
            f"`pattern`={pattern!r} has C(M, N)={count} candidate patterns, more than `max_candidates`="
            f"{max_candidates}: its fp32 logits and AdamW state would take {per_weight:.0f} bytes per pruned weight "
            f"({per_weight:.0f} GB per billion weights, against 2 bytes for a bf16 weight); use a pattern with at "
            f"most {max_candidates} candidates (2:4 has 6, 4:8 has 70) or raise `max_candidates` knowingly"
        )
    return count


def candidate_patterns(pattern: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The (C(M, N), M) 0/1 float matrix of every way to keep N of M, in `itertools.combinations` order."""
    n, m = parse_pattern(pattern)
    rows = [[1.0 if j in kept else 0.0 for j in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows, device=device)


def pattern_indices(keep: torch.Tensor, pattern: str) -> torch.Tensor:
    """The candidate index of every group of a bool (..., cols) mask that is exactly N:M: (..., cols/M) int64.

    Raises a ValueError naming the first group that does not keep exactly N of M.
    """
    n, m = parse_pattern(pattern)
    if keep.dtype != torch.bool or keep.shape[-1] % m:
        got = f"{keep.dtype} of shape {tuple(keep.shape)}"
        raise ValueError(f"a prior mask must be bool with columns divisible by {m}, got {got}")
    groups = keep.reshape(*keep.shape[:-1], keep.shape[-1] // m, m)
    counts = groups.sum(-1)
    if not torch.all(counts == n):
        bad = (counts != n).nonzero()[0].tolist()
        raise ValueError(
            f"a prior mask must keep exactly {n} of every {m} (pattern {pattern!r}); group {bad} keeps "
            f"{int(counts[tuple(bad)])}"
        )
    codes = (groups.long() << torch.arange(m, device=keep.device)).sum(-1)
    lookup = torch.full((2**m,), -1, dtype=torch.long, device=keep.device)
    table = candidate_patterns(pattern, keep.device).long()
    lookup[(table << torch.arange(m, device=keep.device)).sum(-1)] = torch.arange(table.shape[0], device=keep.device)
    return lookup[codes]


def init_logits(
    shape: torch.Size | tuple[int, ...],
    pattern: str,
    prior: torch.Tensor | None = None,
    prior_strength: float = 3.0,
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits (..., rows, cols/M, C) for a weight matrix of `shape` (..., rows, cols).

    Random N(0, init_std²) (`prior=None`: no pattern preferred), then MaskLLM's prior (section 3.3):
    `logits += (onehot(prior) − 1)·std(logits)·prior_strength`, which lowers every candidate but the
    prior's by `prior_strength` standard deviations; a huge strength makes the prior the argmax everywhere.
    `rows=(start, count)` gives only those rows (a rank's block under FSDP2; `prior` is of the block), the
    same values as the whole matrix's: the random draw and its std are the whole matrix's.
    """
    _, m = parse_pattern(pattern)
    *lead, cols = shape
    if cols % m:
        raise ValueError(f"`pattern`={pattern!r} needs the input dimension to divide by {m}, got {cols}")
    noise = torch.randn((*lead, cols // m, candidate_count(pattern)), generator=generator, device=device)
    logits = noise * init_std
    std = logits.std()
    if rows is not None:
        logits = logits.narrow(-3, *rows)
    if prior is not None:
        onehot = torch.nn.functional.one_hot(pattern_indices(prior.to(logits.device), pattern), logits.shape[-1])
        logits = logits + (onehot.to(logits.dtype) - 1.0) * std * prior_strength
    return logits.to(dtype)


def gumbel_noise(
    logits: torch.Tensor, generator: torch.Generator | None = None, rows: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Standard Gumbel noise −log(−log U) of the logits' shape, fp32, from `generator`. With `rows=(start,
    count, total)` the logits are those rows of a `total`-row whole: the whole's noise is drawn (every rank
    draws the same) and those rows returned, so a rank's block gets what one process would."""
    shape = logits.shape if rows is None else (*logits.shape[:-3], rows[2], *logits.shape[-2:])
    uniform = torch.rand(shape, generator=generator, device=logits.device, dtype=torch.float32)
    if rows is not None:
        uniform = uniform.narrow(-3, rows[0], rows[1])
    tiny = torch.finfo(torch.float32).tiny  # U in (0, 1): keep both logs finite
    return -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 2**-24)))


def soft_mask(
    logits: torch.Tensor,
    patterns: torch.Tensor,
    tau: float,
    scale: float,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """MaskLLM's differentiable mask `softmax((κ·logits + g)/τ) @ P` in the matrix shape (fp32).

    The scale κ multiplies the logits before the Gumbel noise g is added (MaskLLM section 3.3: the
    categorical's probabilities are softmax(κ·logits); its code: `gumbel_softmax(gate * scale, tau)`),
    so a larger κ makes the sample follow the logits more and the noise less; τ sharpens the result.
    """
    z = logits.float() * scale
    if noise is not None:
        z = z + noise
    probabilities = torch.softmax(z / tau, dim=-1)
    mask = probabilities @ patterns
    return mask.reshape(*logits.shape[:-2], -1)


def hard_mask(logits: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """The argmax candidate of every group as a bool mask in the matrix shape (exactly N of every M).

    Ties go to the lower candidate index (`torch.argmax`'s first maximum).
    """
    chosen = patterns.bool()[logits.argmax(dim=-1)]
    return chosen.reshape(*logits.shape[:-2], -1)
