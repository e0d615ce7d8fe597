"""Learned N:M masks on a Trainer (MaskLLM, Fang et al., NeurIPS 2024): the math is in `lightning_prune.learned`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune.callbacks.learned_state import LearnedState
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.callbacks.strategy import is_fsdp2
from lightning_prune.learned import Anneal, LearnedMasks, check_candidates, freeze_parameters
from lightning_prune.learned.schedules import ANNEAL_SHAPES
from lightning_prune.learned.state import load_learning_state
from lightning_prune.masking import get_mask, get_masks, remove_mask, set_mask
from lightning_prune.oneshot.magnitude import magnitude_mask
from lightning_prune.oneshot.method import OneShotMethod
from lightning_prune.parallel.sharded import local_tensor
from lightning_prune.selection import parse_pattern
from lightning_prune.targets import PruneTarget
from lightning_prune.validation import check_bool, check_choice, check_number, check_optional_integer

LOGITS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LearnedSparsity(LearnedState):
    """Learn an N:M mask during `fit`: logits over the candidate patterns, Gumbel-softmax, the argmax at the end.

    Every group of M weights (along the input dimension) of every target holds C(M, N) logits (6 for
    2:4). Each training batch draws one soft mask `softmax((κ·logits + g)/τ) @ P` and the targets compute
    with `W ⊙ mask` in its forwards (whatever the modules' train/eval mode); validation and every forward
    outside a training batch use the hard argmax mask (the metrics of the final N:M model). τ and κ
    anneal from `tau_start`/`scale_start` to `tau_end`/`scale_end` (`anneal`) until `end_step` (default:
    the fit's last step).

    The logits are this callback's, not the LightningModule's: it steps its own AdamW (`lr`) once per
    optimizer step of the Trainer (gradients averaged over DDP ranks), so any LightningModule works
    unchanged (automatic or manual optimization, gradient accumulation, its own optimizers and LR
    schedules), and the logits' optimizer state is in this callback's checkpoint state. The loss is
    whatever the module (or `KnowledgeDistillation`) trains with.

    `prior` (a registered one-shot method: "sparsegpt", "wanda", "magnitude", ...; None: random) starts
    the logits from a one-shot N:M mask calibrated on the fit's training data (`calibration`,
    `num_samples`, `forward` as in `OneShotPruning`), `prior_strength` standard deviations ahead; the
    targets are then the one-shot's (Linear/Conv1D inside the blocks) and the weights stay dense (a
    weight update such as SparseGPT's is not kept). `train_weights=False` (MaskLLM's setting) freezes
    the targets' weights during the fit, `freeze_others=True` every other parameter too; `regularizer`
    λ adds MaskLLM's −λ‖W ⊙ M‖² (decayed linearly to 0), which favours masks that keep large weights.

    Under FSDP2 (`ModelParallelStrategy`) every rank holds the logits (and their AdamW state) of its own
    row block of each weight, learns what one process would, and saves them as row blocks into the
    distributed checkpoint; the prior is then `None` or "magnitude" (a calibrated one needs whole weights).

    Lifecycle: `on_fit_start` refuses masked targets, computes the prior (once), makes the logits, freezes
    and hooks the targets' forwards; `on_train_start` resolves the schedules' length; `on_train_batch_start`
    samples the soft masks; `on_train_batch_end` steps the logits when the Trainer stepped; `on_train_end`
    turns the argmax into fixed bool masks on the usual path (`set_mask`: `finalize`, `sparsity_report`,
    LoRA recovery, distillation stages and the 2:4 export work unchanged), unfreezes and drops the logits. `memory`:
    bytes per pruned weight of the logits and their optimizer state. Resume restores the logits, their
    optimizer, the step and the Gumbel noise's generator exactly.

    Example YAML (`lightning_prune/conf/pruning/learned.yaml`)::

        _target_: lightning_prune.LearnedSparsity
        pattern: "2:4"        # keep N of every M
        prior: sparsegpt      # one-shot mask the logits start from; null: none
        lr: 0.01              # AdamW learning rate of the logits
    """

    def __init__(
        self,
        pattern: str = "2:4",
        prior: str | OneShotMethod | None = "sparsegpt",
        prior_strength: float = 10.0,
        prior_options: dict[str, Any] | None = None,
        calibration: Iterable[Any] | None = None,
        num_samples: int | None = 128,
        forward: Callable[[nn.Module, Any], Any] | str | None = None,
        lr: float = 1e-2,
        tau_start: float = 4.0,
        tau_end: float = 0.05,
        scale_start: float = 100.0,
        scale_end: float = 500.0,
        anneal: str = "linear",
        end_step: int | None = None,
        train_weights: bool = False,
        freeze_others: bool = False,
        regularizer: float = 0.0,
        logits_dtype: str = "float32",
        max_candidates: int = 70,
        init_std: float = 0.02,
        seed: int = 0,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        finalize_on_end: bool = False,
    ) -> None:
        n, m = parse_pattern(pattern)
        check_candidates(pattern, max_candidates)
        numbers = {"tau_start": tau_start, "tau_end": tau_end, "scale_start": scale_start, "scale_end": scale_end}
        for name, value in {**numbers, "lr": lr, "init_std": init_std}.items():
            check_number(value, name, low=0, low_open=True)
        for name, value in {"prior_strength": prior_strength, "regularizer": regularizer}.items():
            check_number(value, name, low=0)
        check_choice(anneal, "anneal", ANNEAL_SHAPES)
        check_choice(logits_dtype, "logits_dtype", tuple(LOGITS_DTYPES))
        check_optional_integer(end_step, "end_step", low=1)
        check_bool(train_weights, "train_weights")
        check_bool(freeze_others, "freeze_others")
        super().__init__((m - n) / m, pattern, targets, ignore, finalize_on_end)
        # Built here so that a bad method name or option fails when the callback is made, before any fit.
        self.prior_pruner = None if prior is None else OneShotPruning(
            prior, self.sparsity, pattern, prior_options, calibration=calibration, num_samples=num_samples,
            targets=targets, ignore=ignore, progress=False, forward=forward,
        )  # fmt: skip
        self.prior, self.prior_strength, self.lr = prior, prior_strength, lr
        self.tau = (tau_start, tau_end)
        self.scale = (scale_start, scale_end)
        self.anneal, self.end_step = anneal, end_step
        self.train_weights, self.freeze_others, self.regularizer = train_weights, freeze_others, regularizer
        self.logits_dtype, self.init_std, self.seed = LOGITS_DTYPES[logits_dtype], init_std, seed
        self.step = 0  # optimizer steps taken by the logits: the schedules' clock
        self.converted = False  # the argmax became the bool masks (on_train_end)
        self.memory: dict[str, float] = {}  # bytes per pruned weight: logits, optimizer, total
        self.learner: LearnedMasks | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._restored_learning: dict[str, Any] = {}
        self._learning_blocks: dict[str, dict[str, torch.Tensor]] = {}
        self._frozen: list[nn.Parameter] = []
        self._global_step_at_batch_start = 0
        self._anneals: tuple[Anneal, ...] = ()

    def resolve_targets(self, model: nn.Module) -> list[PruneTarget]:
        """With a `prior`, the one-shot's targets (inside the blocks); without, `MaskingCallback`'s."""
        if self.prior_pruner is not None:
            return self.prior_pruner.resolve_targets(model)
        return super().resolve_targets(model)

    def preflight(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Targets and pattern (`MaskingCallback.preflight`); given the Trainer: a prior FSDP2 can compute, a length."""
        if trainer is not None and is_fsdp2(trainer.strategy) and self.prior not in (None, "magnitude"):
            raise ValueError(
                f"LearnedSparsity's `prior`={self.prior!r} calibrates on whole weights, which ModelParallelStrategy "
                "(FSDP2) shards; under FSDP2 use prior=None or 'magnitude' (each rank's rows), or learn under "
                "strategy='ddp' or in one process"
            )
        super().preflight(pl_module, trainer)
        if trainer is not None and self.freeze_others and trainer.world_size > 1:
            raise ValueError(
                "LearnedSparsity's `freeze_others`=True freezes parameters after DDP registered them (it would wait "
                "for their gradients); under DDP set requires_grad=False on them in your LightningModule instead"
            )
        if trainer is not None and self.end_step is None and trainer.max_steps == -1 and trainer.max_epochs == -1:
            raise ValueError(
                "LearnedSparsity's `end_step`=None anneals τ and κ until the Trainer's last step, but the Trainer "
                "trains without end (max_epochs=-1, max_steps=-1); set trainer.max_steps or max_epochs, or `end_step`"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # a meta-device model is refused before anything is frozen
        if stage == "fit" and not self.converted:  # before DDP wraps the module: it registers trainable parameters
            self.freeze(pl_module, targets=not self.train_weights, others=False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)
        if self.converted:  # resumed after the mask was fixed (the checkpoint said so after `setup` froze)
            self.unfreeze()
        else:
            self.start_learning(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_step_at_batch_start = trainer.global_step
        if self.learner is not None:
            self.sample(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.learner is not None:
            self.learner.clear_sample()  # validation and other forwards between steps use the hard mask
            if trainer.global_step > self._global_step_at_batch_start:
                self.step_logits()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.learner is not None:
            self.convert()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.learner is not None:  # the fit ended before on_train_end: hooks off, weights as they were
            self.learner.detach()
        self.unfreeze()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.on_exception(trainer, pl_module, RuntimeError(stage))

    def check_no_masks(self, pl_module: nn.Module) -> None:
        """The targets must not be masked already (an earlier stage's mask would be silently overridden)."""
        if masked := [t.name for t in self._targets if get_mask(t.module, t.param_name) is not None]:
            raise ValueError(
                f"LearnedSparsity learns the masks of unmasked weights, but {masked[:3]} (of {len(masked)}) already "
                "have masks (an earlier pruning stage or callback); learn on the dense model, with `prior` for the "
                "one-shot start"
            )

    def prior_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The one-shot prior's N:M masks of the targets; the weights are put back as they were. Under FSDP2
        (magnitude, `preflight`) each rank's of its own rows, as one process selects them (rows stay whole)."""
        assert self.prior_pruner is not None
        if self._sharded:
            local = {t.name: (t, t.as_matrix(local_tensor(t.weight).detach())) for t in self._targets}
            return {
                name: t.from_matrix(magnitude_mask(w, self.sparsity, self.pattern)) for name, (t, w) in local.items()
            }
        saved = {t.name: t.weight.detach().clone() for t in self._targets}
        self.prior_pruner.prune(trainer, pl_module)
        masks = {name: mask.clone() for name, mask in get_masks(pl_module).items()}
        with torch.no_grad():
            for target in self._targets:
                remove_mask(target.module, target.param_name)
                target.weight.copy_(saved[target.name])
        return masks

    def start_learning(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the logits (from the prior, or from a checkpoint), freeze, hook the forwards, resolve τ/κ."""
        self.check_no_masks(pl_module)
        restored, self._restored_learning = self._restored_learning, {}
        priors = self.prior_masks(trainer, pl_module) if self.prior_pruner is not None and not restored else None
        options = (self.prior_strength, self.init_std, self.seed, self.logits_dtype, self._sharded)
        self.learner = LearnedMasks(self._targets, str(self.pattern), priors, *options)
        self.optimizer = torch.optim.AdamW(self.learner.parameters(), lr=self.lr, weight_decay=0.0)
        if restored:
            load_learning_state(self.learner, self.optimizer, restored, self._learning_blocks)
        self.learner.attach()
        self.freeze(pl_module, targets=False, others=self.freeze_others)
        self.memory = self.learner.memory(self.optimizer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The length may come from `estimated_stepping_batches`, which sets up the train loader: here Lightning
        # has restored its loops and the loader's state (in `on_fit_start` a mid-epoch checkpoint's loader
        # state would never load: Lightning 2.6, issue #20550).
        super().on_train_start(trainer, pl_module)
        if self.learner is None:
            return
        total = self.end_step or trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("`end_step`=None needs a Trainer with a finite length (max_steps or max_epochs)")
        steps = max(int(total), 1)  # λ decays linearly to 0, as in MaskLLM
        self._anneals = (Anneal(*self.tau, steps, self.anneal), Anneal(*self.scale, steps, self.anneal))
        self._anneals += (Anneal(self.regularizer, 0.0, steps),)

    def sample(self, pl_module: pl.LightningModule) -> None:
        """This batch's soft masks at the schedules' τ and κ; logs `learned/tau` and `learned/scale`."""
        assert self.learner is not None
        tau, scale, regularizer = (anneal(self.step) for anneal in self._anneals)
        self.learner.regularizer = regularizer
        self.learner.sample(tau, scale)
        pl_module.log_dict({"learned/tau": tau, "learned/scale": scale}, on_step=True, on_epoch=False)

    def step_logits(self) -> None:
        """One AdamW step of the logits on their gradients (averaged over DDP ranks: identical logits)."""
        assert self.learner is not None and self.optimizer is not None
        self.learner.average_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.learner.step_done()
        self.step += 1
        if self.step == 1:  # AdamW's state exists from its first step on
            self.memory = self.learner.memory(self.optimizer)

    def freeze(self, pl_module: nn.Module, targets: bool, others: bool) -> None:
        """Freeze the targets' weights (in `setup`, before the optimizers: `configure_optimizers` may leave frozen
        weights out) and every other parameter (in `on_fit_start`, after them: an optimizer needs a parameter)."""
        weights = [t.weight for t in self.resolve_targets(pl_module)]
        self._frozen += freeze_parameters(pl_module, weights, targets, others)

    def unfreeze(self) -> None:
        """Give back `requires_grad` to every parameter `freeze` froze."""
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []

    def convert(self) -> dict[str, torch.Tensor]:
        """The argmax becomes each target's fixed bool mask (`set_mask`); hooks, freezing and logits go away."""
        assert self.learner is not None
        hard = self.learner.hard_masks()
        self.learner.detach()
        self.unfreeze()
        for target in self._targets:
            set_mask(target.module, hard[target.name], target.param_name)
        kept = {name: int(mask.sum()) for name, mask in hard.items()}
        self.layer_sparsity = {name: 1.0 - kept[name] / hard[name].numel() for name in hard}
        self.current_sparsity = 1.0 - sum(kept.values()) / sum(mask.numel() for mask in hard.values())
        self.reached_sparsity = self.sparsity
        self.learner, self.optimizer, self.converted = None, None, True
        return self.masks()
