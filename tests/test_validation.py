"""validation.py and its users: NaN, infinity, strings and bools are refused, naming the argument."""

import math

import pytest

from lightning_prune.callbacks.lora import LoRARecovery
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.lora import check_lora_arguments
from lightning_prune.validation import check_integer, check_number


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
        (lambda: OneShotPruning("sparsegpt", method_options={"percdamp": math.inf}), r"`percdamp` must be a finite number > 0, got inf"),
        (lambda: OneShotPruning("sparsegpt", method_options={"percdamp": "0.01"}), r"`percdamp` must be a finite number > 0, got '0.01'"),
        (lambda: OneShotPruning("sparsegpt", method_options={"blocksize": "128"}), r"`blocksize` must be an integer >= 1, got '128'"),
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
