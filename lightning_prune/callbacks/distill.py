"""`KnowledgeDistillation`: add a distillation loss from a frozen dense teacher to the training loss."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from transformers import AutoConfig

from lightning_prune.callbacks.distill_sharded import ShardedTeacher
from lightning_prune.callbacks.lora import wrapped_network
from lightning_prune.callbacks.strategy import is_fsdp2
from lightning_prune.masking import get_masks
from lightning_prune.recovery.compat import check_sizes, check_teacher_fits, resolve_layers
from lightning_prune.recovery.losses import DISTILL_LOSSES, distill_loss, mix_losses
from lightning_prune.recovery.teacher import Call, OutputCapture, freeze, frozen_copy, main_output, place_teacher, resolve_teacher_device, resolve_teacher_dtype, run_teacher
from lightning_prune.validation import check_number


class KnowledgeDistillation(ShardedTeacher, Callback):
    """Train with `α·task + (1−α)·KD`, KD measured against a frozen teacher (Hinton et al., 2015).

    The teacher is, by default, a frozen copy of the student taken in `setup(stage="fit")`, which
    Lightning runs before any callback's `on_fit_start` — so before OneShotPruning, GradualPruning
    or LoRARecovery change the model, whatever the order of the callbacks. It can also be a module
    or a local `from_pretrained` directory. It is a plain attribute of this callback, outside the
    LightningModule's module tree: pruning callbacks never see it, the optimizer never updates it,
    it has no masks, and under DDP every rank holds its own copy. Under `ModelParallelStrategy`
    (FSDP2) it is taken in `on_fit_start`, once `configure_model` sharded the student and the
    strategy materialized it, and sharded like the student: each rank holds its blocks only
    (`callbacks/distill_sharded.py`; `teacher_device` is refused there). In a staged run, a stage after
    the first pruning stage gets the dense copy the run took as that stage started
    (`lightning_prune/run/dense_teacher.py`).

    The student is `pl_module.<student_attr>` (default: `pl_module.model` when it is a module, else
    `pl_module`). Hooks on it capture the inputs and outputs of every call that `training_step`
    makes; the teacher runs on the same inputs and the KD loss is mixed into what `training_step`
    returns (automatic optimization only). KD is `loss="kl"` on logits with `temperature`, or
    `"mse"` / `"cosine"` on hidden states: the last hidden state (or logits) when `layers` is None,
    else the outputs of `layers` (block indices of the model's block list, or module names).
    Padding positions (attention_mask == 0) are ignored. With `alpha=0` the task loss is ignored,
    so `training_step` may return None (no labels needed).

    Precision and placement: on the student's device the teacher runs inside the step's autocast
    (AMP applies to both; "16-mixed" on CPU is bf16 in Lightning 2.6). `teacher_device="cpu"`
    keeps it off the accelerator: it then runs in its own dtype, its inputs are moved to it and
    its outputs back. `teacher_dtype` ("bfloat16", or the torch dtype) halves its memory. The
    losses compute in fp32 whatever the two dtypes are.

    Checks before training (`preflight`, and again in `setup`): `layers` name modules of the
    student (the error lists the valid names), a given teacher shares no parameter with the
    student and has its `vocab_size` (and `hidden_size` for hidden-state losses). A student
    compacted by structured pruning still distills logits and block outputs (hidden size
    unchanged); a named layer whose width changed raises on the first step, and `layers` inside
    the blocks are refused once blocks were dropped (an index no longer means the same block).

    How the loss is changed: Lightning 2.6 has no public hook that replaces the training loss, so
    on `on_train_start` this callback sets an instance attribute `pl_module.training_step` that
    wraps the class's method (the strategies, DDP's forward redirection included, look it up on the
    instance; checked with lightning 2.6.6), and deletes it again on `teardown`.

    Checkpoints: `alpha`, `temperature`, `loss` and the teacher's weights (when it is a copy or a
    given module; a teacher given as a path is reloaded from the path), so a resumed fit distills
    from the same dense teacher even after the model was pruned (Lightning calls `setup`, which
    copies the model as passed to fit, before it loads the checkpoint; the saved teacher then
    replaces that copy; under FSDP2 its blocks are in the distributed checkpoint). A checkpoint
    without this callback's state leaves that copy as the teacher, and a copy of a model that
    already has masks is a pruned teacher: both are warned about and kept in `warnings_recorded`.

    Example YAML (under `callbacks:`, as in `lightning_prune/conf/recipe/llama_gmp_distill.yaml`)::

        _target_: lightning_prune.KnowledgeDistillation
        alpha: 0.5            # weight of the task loss; 0 = pure distillation (no labels)
        temperature: 2.0      # softmax temperature of the KL on logits
        loss: kl              # kl | mse | cosine
        layers: null          # null = logits / last hidden state; or block indices / module names
        teacher: null         # null = frozen copy of the model at setup; or a local model directory
        teacher_device: null  # null = the student's device; "cpu" saves accelerator memory
        teacher_dtype: null   # null = as loaded; bfloat16 | float16 | float32 ("bfloat16" halves the memory)
        student_attr: null    # attribute of the LightningModule that is the student; null = `model` or the module
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 2.0,
        loss: str = "kl",
        layers: Sequence[int | str] | None = None,
        teacher: nn.Module | str | None = None,
        teacher_device: str | torch.device | None = None,
        teacher_dtype: str | torch.dtype | None = None,
        student_attr: str | None = None,
    ) -> None:
        self.alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"`loss` must be one of {DISTILL_LOSSES}, got {loss!r}")
        if loss == "kl" and layers is not None:
            raise ValueError(f"`loss`='kl' compares logits; `layers`={layers!r} needs loss='mse' or 'cosine'")
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise ValueError(f"`teacher` must be None, an nn.Module or a model directory, got {type(teacher).__name__}")
        self.loss = loss
        self.layers = list(layers) if layers is not None else None
        self.teacher_source = teacher
        self.teacher_device = resolve_teacher_device(teacher_device)
        self.teacher_dtype = resolve_teacher_dtype(teacher_dtype)
        self.student_attr = student_attr
        self.teacher: nn.Module | None = None
        self.warnings_recorded: list[dict[str, Any]] = []
        self._restored_teacher: dict[str, torch.Tensor] = {}
        self._copied_from: str | None = None  # set when this fit copied the student: "dense" or "pruned"
        self._restored = False
        self._capture: OutputCapture | None = None
        self._layer_names: list[str] = []
        self._pl_module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss=self.loss, layers=str(self.layers))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fsdp2 = is_fsdp2(trainer.strategy)
        if stage == "fit" and not self._fsdp2:
            self.prepare(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fsdp2:  # sharded and materialized now; masking callbacks prune from the first batch on
            self.prepare(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warn_about_the_copy(resuming=trainer.ckpt_path is not None)
        self.attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.detach(pl_module)

    def student(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module distilled: `pl_module.<student_attr>`, else `pl_module.model` or `pl_module`."""
        if self.student_attr is None:
            return wrapped_network(pl_module)
        found = getattr(pl_module, self.student_attr, None)
        if not isinstance(found, nn.Module):
            raise ValueError(f"`student_attr`={self.student_attr!r} names no nn.Module of {type(pl_module).__name__}")
        return found

    def preflight(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Before any training: the student exists, `layers` name its modules, and a given teacher fits it."""
        student = self.student(pl_module)  # type: ignore[arg-type]
        self._layer_names = resolve_layers(student, self.layers)
        if isinstance(self.teacher_source, nn.Module):
            check_teacher_fits(student, self.teacher_source, self.loss, self._layer_names)
        elif self.teacher_source is not None:
            path = Path(self.teacher_source)
            if not (path / "config.json").is_file():
                raise ValueError(f"`teacher`={str(path)!r} must be a local model directory with config.json (from save_pretrained)")
            check_sizes(student, AutoConfig.from_pretrained(str(path), local_files_only=True), str(path), self.loss)  # the config only: cheap

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Preflight, the teacher (taken once: a later fit with this callback keeps it), and its fit to the student."""
        self.preflight(pl_module)
        self._copied_from, self._restored = None, False
        if self.teacher is None:
            self.take_teacher(trainer, pl_module)
        assert self.teacher is not None
        check_teacher_fits(self.student(pl_module), self.teacher, self.loss, self._layer_names)

    def take_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the frozen teacher: a copy of the student now, the given module, or one loaded from a path."""
        student = self.student(pl_module)
        if self._fsdp2:  # restored after this from the distributed checkpoint (`load_state_dict`), if any
            self.teacher = self.sharded_teacher(trainer, student)
            return
        if self.teacher_source is None:
            self._copied_from = "pruned" if get_masks(student) else "dense"
            teacher = frozen_copy(student, share=(trainer,))
        elif isinstance(self.teacher_source, nn.Module):
            teacher = freeze(self.teacher_source)
        else:
            teacher = freeze(self._load_teacher(student, Path(self.teacher_source)))
        if self._restored_teacher:
            teacher.load_state_dict(self._restored_teacher)
            self._restored_teacher, self._restored = {}, True
        self.teacher = place_teacher(teacher, self.teacher_device, self.teacher_dtype)

    @staticmethod
    def _load_teacher(student: nn.Module, path: Path) -> nn.Module:
        loader = getattr(type(student), "from_pretrained", None)
        if loader is None:
            raise ValueError(f"`teacher`={str(path)!r} is a path, but the student {type(student).__name__} has no `from_pretrained` to load it; pass the module")
        teacher: nn.Module = loader(str(path), local_files_only=True)
        return teacher

    def warn_about_the_copy(self, resuming: bool) -> None:
        """Say (and record) when the copied teacher is not the dense model the run expects."""
        if self._copied_from is None or self._restored:
            return
        if resuming:
            self.record_warning(
                "teacher_not_in_checkpoint",
                "KnowledgeDistillation: the checkpoint holds no teacher for this callback, so the teacher is a copy of the "
                "model as passed to fit, before the checkpoint's weights were loaded; pass `teacher=` to choose it",
            )
        elif self._copied_from == "pruned":
            self.record_warning(
                "pruned_teacher",
                "KnowledgeDistillation: the model already had pruning masks at fit start, so the teacher is a copy of the "
                "pruned model, not of the dense one; pass `teacher=` the dense model (or its directory)",
            )

    def record_warning(self, kind: str, message: str) -> None:
        """Warn (UserWarning) and keep the warning in `warnings_recorded` for the run's results."""
        warnings.warn(message, UserWarning, stacklevel=2)
        self.warnings_recorded.append({"kind": kind, "message": message})

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Hook the student, move the teacher to its device, and wrap `pl_module.training_step`."""
        if self.teacher is None:
            raise ValueError("KnowledgeDistillation has no teacher: it is taken in `setup(stage='fit')`; run it inside Trainer.fit")
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"KnowledgeDistillation adds its loss to what training_step returns, but {type(pl_module).__name__} uses manual "
                "optimization (automatic_optimization=False), which ignores it; call `recovery.distill_loss` in your training_step instead"
            )
        if self.teacher_device is None and not self._fsdp2:
            self.teacher.to(pl_module.device)
        self._capture = OutputCapture(self.student(pl_module), self._layer_names).attach()
        self._pl_module = pl_module
        original = type(pl_module).training_step.__get__(pl_module)
        pl_module.training_step = functools.wraps(original)(functools.partial(self._distilled_step, original))  # type: ignore[method-assign]

    def detach(self, pl_module: pl.LightningModule) -> None:
        """Remove the hooks and the `training_step` wrapper; a teacher that follows the student goes to the
        CPU, as Lightning's strategies move the module there at teardown (the next fit moves it back)."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        pl_module.__dict__.pop("training_step", None)
        if self.teacher is not None and self.teacher_device is None and not self._fsdp2:
            self.teacher.to(torch.device("cpu"))

    def _distilled_step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        assert self._capture is not None and self._pl_module is not None
        self._capture.start()
        try:
            output = original(*args, **kwargs)
        finally:
            calls = self._capture.stop()
        kd = self.kd_loss(calls)
        task = output.get("loss") if isinstance(output, dict) else output
        loss = mix_losses(task, kd, self.alpha)
        self._pl_module.log("distill/kd_loss", kd.detach(), prog_bar=True)
        return {**output, "loss": loss} if isinstance(output, dict) else loss

    def kd_loss(self, calls: list[Call]) -> torch.Tensor:
        """The distillation loss averaged over the student calls of one training step."""
        if not calls:
            raise ValueError(
                f"training_step did not call the student {type(self.student(self._pl_module)).__name__} "  # type: ignore[arg-type]
                "(set `student_attr` to the attribute holding the module that training_step runs)"
            )
        assert self.teacher is not None
        losses = [self._call_loss(call) for call in calls]
        return torch.stack(losses).mean()

    def _call_loss(self, call: Call) -> torch.Tensor:
        assert self.teacher is not None
        device = self.teacher_device or next(self.teacher.parameters()).device
        taught = run_teacher(self.teacher, call, self._layer_names, device, self.teacher_dtype)
        mask = call.kwargs.get("attention_mask")
        prefer = ("logits",) if self.loss == "kl" else ("last_hidden_state", "logits")
        pairs = [(f"`{name}`", call.layers[name], taught.layers[name]) for name in self._layer_names]
        pairs = pairs or [("output", main_output(call.output, prefer), main_output(taught.output, prefer))]
        losses = []
        for what, student, teacher in pairs:
            if student.shape != teacher.shape:
                raise ValueError(
                    f"the student's {what} has shape {tuple(student.shape)} and the `teacher`'s {tuple(teacher.shape)}: `loss`={self.loss!r} "
                    "compares equal shapes (a compacted student's narrower layers have no counterpart; use `layers` whose width "
                    "did not change, such as block outputs, or loss='kl' on logits)"
                )
            # Both sides go to the student's device; the losses compute in fp32 whatever the two dtypes are.
            losses.append(distill_loss(self.loss, student, teacher.to(student.device), self.temperature, mask))
        return torch.stack(losses).mean()

    def state_dict(self) -> dict[str, Any]:
        teacher, sharded = self.teacher_state()  # sharded blocks go to the distributed checkpoint (on_save_checkpoint)
        state = {"alpha": self.alpha, "temperature": self.temperature, "loss": self.loss, "teacher_taken": self.teacher is not None}
        return {**state, "teacher": teacher or dict(self._restored_teacher), "sharded_teacher": sharded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alpha = float(state_dict.get("alpha", self.alpha))
        self.temperature = float(state_dict.get("temperature", self.temperature))
        saved = dict(state_dict.get("teacher", {}))
        self._restored = bool(state_dict.get("teacher_taken", False))
        if self._fsdp2 or state_dict.get("sharded_teacher"):  # the teacher is taken (on_fit_start) before Lightning restores
            self.restore_sharded_teacher(saved, list(state_dict.get("sharded_teacher", [])))
        elif saved and self.teacher is not None:  # restored after `setup`: the usual order
            self.teacher.load_state_dict(saved)
        else:
            self._restored_teacher = saved
