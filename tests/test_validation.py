"""validation.py and its users: NaN, infinity, strings and bools are refused, naming the argument."""

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_prune import (
    ONESHOT_METHODS,
    DSnoT,
    GradualPruning,
    IterativePruning,
    KnowledgeDistillation,
    LearnedSparsity,
    Ria,
    StructuredPruning,
    attach_lora,
    distill_loss,
    finalize,
    magnitude_mask,
    make_schedule,
    prune_oneshot,
    prune_structured,
    reconstruct_block,
    select_masks,
    sparsegpt_prune,
    wanda_mask,
)
from lightning_prune.callbacks.lora import LoRARecovery
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.data import DigitsDataModule
from lightning_prune.lora import check_lora_arguments
from lightning_prune.models import ClassifierModule
from lightning_prune.validation import (
    check_choice,
    check_fraction,
    check_integer,
    check_number,
    check_optional_integer,
    check_sparsity,
)


def test_check_number_bounds_and_types() -> None:
    assert check_number(3, "x", low=0.0, low_open=True) == 3.0
    assert check_number(0.0, "x", low=0.0) == 0.0
    with pytest.raises(ValueError, match=r"`x` must be a finite number > 0, got 0.0"):
        check_number(0.0, "x", low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"`x` must be a finite number >= 0 and < 1, got 1.0"):
        check_number(1.0, "x", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"`x` must be a finite number, got '1e-3' of type str"):
        check_number("1e-3", "x")
    with pytest.raises(ValueError, match=r"`x` must be a finite number, got True of type bool"):
        check_number(True, "x")
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1, got '4' of type str"):
        check_integer("4", "n", low=1)
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1, got 0$"):
        check_integer(0, "n", low=1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoRARecovery(alpha=math.nan), r"`alpha` must be a finite number > 0, got nan"),
        (lambda: LoRARecovery(alpha=math.inf), r"`alpha` must be a finite number > 0, got inf"),
        (lambda: LoRARecovery(alpha="16"), r"`alpha` must be a finite number > 0, got '16' of type str"),
        (lambda: LoRARecovery(lr=math.inf), r"`lr` must be a finite number > 0, got inf"),
        (lambda: LoRARecovery(lr=math.nan), r"`lr` must be a finite number > 0, got nan"),
        (lambda: LoRARecovery(lr="1e-3"), r"`lr` must be a finite number > 0, got '1e-3' of type str"),
        (lambda: LoRARecovery(dropout=math.nan), r"`dropout` must be a finite number >= 0 and < 1, got nan"),
        (lambda: LoRARecovery(r="8"), r"`r` must be an integer >= 1, got '8' of type str"),
        (
            lambda: OneShotPruning("sparsegpt", method_options={"percdamp": math.inf}),
            r"`percdamp` must be a finite number > 0, got inf",
        ),
        (
            lambda: OneShotPruning("sparsegpt", method_options={"percdamp": "0.01"}),
            r"`percdamp` must be a finite number > 0, got '0.01'",
        ),
        (
            lambda: OneShotPruning("sparsegpt", method_options={"blocksize": "128"}),
            r"`blocksize` must be an integer >= 1, got '128'",
        ),
        (lambda: OneShotPruning("wanda", sparsity=math.nan), r"`sparsity` must be a number in \[0, 1\), got nan"),
        (lambda: OneShotPruning("wanda", sparsity="0.5"), r"`sparsity` must be a number in \[0, 1\), got '0.5'"),
        (lambda: OneShotPruning("wanda", num_samples="8"), r"`num_samples` must be None or an integer >= 1, got '8'"),
    ],
)
def test_non_finite_and_string_arguments_are_refused_by_name(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_check_lora_arguments_accepts_valid_values() -> None:
    check_lora_arguments(8, 16.0, 0.0)
    check_lora_arguments(1, 1, 0.5)


def _tiny() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _block_inputs() -> tuple[nn.Module, list, list]:
    return nn.Linear(4, 4), [((torch.ones(2, 4),), {})], [torch.ones(2, 4)]


# Every public callable with numeric arguments: (name, call(**kwargs), the valid arguments it needs).
CALLS: dict[str, tuple[Callable[..., object], dict[str, Any]]] = {
    "GradualPruning": (GradualPruning, {"sparsity": 0.5}),
    "IterativePruning": (IterativePruning, {"sparsity": 0.5, "cycles": 2, "epochs_per_cycle": 1}),
    "OneShotPruning": (OneShotPruning, {"reconstruct": True}),
    "StructuredPruning": (StructuredPruning, {"mlp_sparsity": 0.5}),
    "LoRARecovery": (LoRARecovery, {}),
    "KnowledgeDistillation": (KnowledgeDistillation, {}),
    "prune_oneshot": (lambda **kw: prune_oneshot(_tiny(), None, **kw), {"reconstruct": True}),
    "prune_structured": (lambda **kw: prune_structured(_tiny(), None, **kw), {"mlp_sparsity": 0.5}),
    "attach_lora": (lambda **kw: attach_lora(_tiny(), **kw), {}),
    "make_schedule": (lambda **kw: make_schedule("exponential", **kw), {"sparsity": 0.5, "end_step": 10}),
    "reconstruct_block": (lambda **kw: reconstruct_block(*_block_inputs(), **kw), {}),
    "distill_loss": (lambda **kw: distill_loss("kl", torch.zeros(2, 3), torch.zeros(2, 3), **kw), {}),
    "select_masks": (lambda **kw: select_masks({"w": torch.ones(2, 4)}, **kw), {"sparsity": 0.5}),
    "magnitude_mask": (lambda **kw: magnitude_mask(torch.ones(2, 4), **kw), {"sparsity": 0.5}),
    "wanda_mask": (lambda **kw: wanda_mask(torch.ones(2, 4), torch.ones(4), **kw), {"sparsity": 0.5}),
    "sparsegpt_prune": (lambda **kw: sparsegpt_prune(torch.ones(2, 4), torch.eye(4), **kw), {"sparsity": 0.5}),
    "SparseGPT": (lambda **kw: ONESHOT_METHODS.create("sparsegpt", **kw), {}),
    "Ria": (Ria, {}),
    "DSnoT": (DSnoT, {}),
    "DigitsDataModule": (DigitsDataModule, {}),
    "ClassifierModule": (ClassifierModule, {}),
}

# (callable, argument, the name the error gives it): one row per numeric argument.
NUMERIC_ARGUMENTS = [
    *(("GradualPruning", a, a) for a in ("sparsity", "initial_sparsity", "start_step", "end_step", "frequency")),
    *(("IterativePruning", a, a) for a in ("sparsity", "cycles", "epochs_per_cycle", "rewind")),
    *(("OneShotPruning", a, a) for a in ("sparsity", "num_samples", "reconstruct_steps", "reconstruct_lr")),
    *(("StructuredPruning", a, a) for a in ("mlp_sparsity", "head_sparsity", "drop_layers", "num_samples")),
    *(("LoRARecovery", a, a) for a in ("r", "alpha", "dropout", "lr")),
    *(("KnowledgeDistillation", a, a) for a in ("alpha", "temperature")),
    *(("prune_oneshot", a, a) for a in ("sparsity", "num_samples", "min_expert_tokens", "owl_threshold", "owl_lambda")),
    *(("prune_oneshot", a, a) for a in ("reconstruct_steps", "reconstruct_lr")),
    *(("prune_structured", a, a) for a in ("mlp_sparsity", "head_sparsity", "drop_layers")),
    *(("attach_lora", a, a) for a in ("r", "alpha", "dropout")),
    ("make_schedule", "sparsity", "sparsity"),
    ("make_schedule", "initial_sparsity", "initial_sparsity"),
    ("make_schedule", "start_step", "start_step"),
    ("make_schedule", "end_step", "end_step"),
    ("make_schedule", "rate", "rate"),
    ("reconstruct_block", "steps", "reconstruct_steps"),
    ("reconstruct_block", "lr", "reconstruct_lr"),
    ("distill_loss", "temperature", "temperature"),
    ("select_masks", "sparsity", "sparsity"),
    ("magnitude_mask", "sparsity", "sparsity"),
    ("wanda_mask", "sparsity", "sparsity"),
    *(("sparsegpt_prune", a, a) for a in ("sparsity", "blocksize", "percdamp")),
    *(("SparseGPT", a, a) for a in ("blocksize", "percdamp")),
    ("Ria", "a", "a"),
    *(("DSnoT", a, a) for a in ("max_cycle_time", "update_threshold", "pow_of_var_regrowing")),
    *(("DigitsDataModule", a, a) for a in ("batch_size", "val_fraction")),
    *(("ClassifierModule", a, a) for a in ("hidden", "num_classes", "lr")),
]
BAD_NUMBERS = [True, math.nan, math.inf, "1"]  # a bool is no number, NaN and infinity no value, "1" a YAML slip


@pytest.mark.parametrize("bad", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize(("name", "argument", "shown"), NUMERIC_ARGUMENTS)
def test_numeric_arguments_refuse_bools_nan_inf_and_strings(name: str, argument: str, shown: str, bad: object) -> None:
    call, valid = CALLS[name]
    with pytest.raises(ValueError, match=rf"`{shown}`.*{re.escape(repr(bad))}"):
        call(**{**valid, argument: bad})


BOOL_ARGUMENTS = [
    ("DSnoT", "without_same_sign"),
    ("prune_oneshot", "reconstruct"),
    ("OneShotPruning", "reconstruct"),
    ("GradualPruning", "compact_on_end"),
]


@pytest.mark.parametrize("bad", [1, 0.0, "true"], ids=repr)
@pytest.mark.parametrize(("name", "argument"), BOOL_ARGUMENTS)
def test_bool_arguments_refuse_numbers_and_strings(name: str, argument: str, bad: object) -> None:
    call, valid = CALLS[name]
    with pytest.raises(ValueError, match=rf"`{argument}` must be true or false, got {re.escape(repr(bad))}"):
        call(**{**valid, argument: bad})


def test_choices_never_take_a_bool_for_an_int() -> None:
    assert check_choice(2, "p", (1, 2)) == 2
    with pytest.raises(ValueError, match=r"`p` must be one of \(1, 2\), got True$"):
        check_choice(True, "p", (1, 2))
    with pytest.raises(ValueError, match=r"`scope` must be one of \('layer', 'row'\), got 'rows'$"):
        check_choice("rows", "scope", ("layer", "row"))


def test_optional_integers_sparsities_and_fractions() -> None:
    assert check_optional_integer(None, "n", low=1) is None and check_optional_integer(3, "n", low=1) == 3
    with pytest.raises(ValueError, match=r"`n` must be None or an integer >= 1, got 0$"):
        check_optional_integer(0, "n", low=1)
    assert check_sparsity(0, "s") == 0.0 and isinstance(check_sparsity(0, "s"), float)
    with pytest.raises(ValueError, match=r"`s` must be a number in \[0, 1\), got '0.5' of type str"):
        check_sparsity("0.5", "s")
    assert check_fraction(0.25, "f") == 0.25
    with pytest.raises(ValueError, match=r"`f` must be in \(0, 1\), got 0.0$"):
        check_fraction(0.0, "f")


META = (
    r"`model` \((LlamaForCausalLM|TinyRegressor)\) is on the meta device: \d+ of its tensors \('.*'.*\) have a "
    r"shape but no values\. Materialize it first: `model\.to_empty\(device='cpu'\)`"
)


@pytest.fixture
def meta_llama() -> nn.Module:
    from tests.conftest import tiny_llama

    with torch.device("meta"):
        return tiny_llama(seed=None)


@pytest.mark.parametrize(
    "call",
    [
        lambda model: prune_oneshot(model, None, method="magnitude", sparsity=0.5, progress=False),
        lambda model: prune_structured(model, None, mlp_sparsity=0.5, method="magnitude"),
        lambda model: finalize(model),
        lambda model: GradualPruning(0.5).preflight(model),
        lambda model: OneShotPruning("magnitude", 0.5, progress=False).preflight(model),
    ],
    ids=["prune_oneshot", "prune_structured", "finalize", "GradualPruning", "OneShotPruning"],
)
def test_a_model_on_the_meta_device_is_named_with_what_to_do(meta_llama: nn.Module, call: Callable) -> None:
    with pytest.raises(ValueError, match=META):
        call(meta_llama)


def test_a_pruning_callback_refuses_a_meta_module_before_lightning_moves_it() -> None:
    from tests.conftest import TinyRegressor, make_trainer

    with torch.device("meta"):
        module = TinyRegressor()
    trainer = make_trainer(max_epochs=1, callbacks=[GradualPruning(0.5)])
    with pytest.raises(ValueError, match=META):
        GradualPruning(0.5).setup(trainer, module, "fit")
    # Through `fit`, Lightning's teardown then fails moving the meta module to CPU: ours is the first error.
    with pytest.raises(Exception) as raised:
        trainer.fit(module)
    chain = [raised.value, raised.value.__context__]
    assert any(isinstance(e, ValueError) and re.match(META, str(e)) for e in chain)


@pytest.mark.parametrize(
    "callback",
    [
        lambda: StructuredPruning(mlp_sparsity=0.5, method="flap"),  # its setup adds FLAP's biases
        lambda: LearnedSparsity(prior=None),  # its setup freezes the targets
    ],
    ids=["StructuredPruning", "LearnedSparsity"],
)
def test_callbacks_with_their_own_setup_still_refuse_a_meta_module_there(callback: Callable) -> None:
    from tests.conftest import TinyRegressor, make_trainer

    with torch.device("meta"):
        module = TinyRegressor()
    with pytest.raises(ValueError, match=META):
        callback().setup(make_trainer(max_epochs=1), module, "fit")
