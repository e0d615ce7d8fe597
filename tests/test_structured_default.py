"""`prune_structured`'s automatic score (`method`=None): FLAP with calibration, magnitude without, the fallbacks."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_prune import StructuredPruning
from lightning_prune.structured import prune_structured
from tests.conftest import TinyCausalLM, make_trainer, tiny_bert_classifier, tiny_llama


def _tokens(model: nn.Module, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    return [{"input_ids": torch.randint(0, vocab, (2, 8), generator=generator)} for _ in range(count)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _automatic_and_explicit(build: Callable[[], nn.Module], method: str, calibrated: bool = True, **kw: Any) -> Any:
    """Prune two identical models, automatically and with `method`; return the report and whether they match."""
    automatic, explicit = build(), build()
    batches = _tokens(automatic) if calibrated else None
    report = prune_structured(automatic, batches, mlp_sparsity=0.5, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        given = prune_structured(explicit, batches, mlp_sparsity=0.5, method=method)
    assert given.method_choice == "given"
    return report, _same(_state(automatic), _state(explicit))


@pytest.mark.parametrize("build", [tiny_bert_classifier, tiny_llama], ids=["bert", "llama"])
def test_calibration_gives_flap_bitwise_equal_to_the_explicit_method(build: Callable[[], nn.Module]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FLAP applies: no fallback warning
        report, same = _automatic_and_explicit(build, "flap")
    assert report.method == "flap" and same
    assert report.method_choice == "automatic: calibration batches given, so 'flap' (the best measured score)"
    assert report.as_dict()["method_choice"] == report.method_choice and not report.notes
    assert "structured pruning (flap; automatic: calibration batches given" in str(report)


def test_no_calibration_gives_magnitude() -> None:
    report, same = _automatic_and_explicit(tiny_llama, "magnitude", calibrated=False)
    assert report.method == "magnitude" and same and not report.notes
    assert report.method_choice == "automatic: no calibration batches, so the weight-only 'magnitude'"


def test_a_bias_the_config_cannot_add_falls_back_to_wanda_warned_and_noted() -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    def qwen2() -> nn.Module:  # o_proj and the MLP have no bias, and Qwen2Config has no flag to add one
        torch.manual_seed(0)
        config = Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
        )
        return AutoModelForCausalLM.from_config(config.__class__(**{**config.to_dict(), "vocab_size": 48}))

    with pytest.warns(UserWarning, match=r"'flap' cannot apply \(.*cannot add one.*\); using 'wanda'"):
        report, same = _automatic_and_explicit(qwen2, "wanda")
    assert report.method == "wanda" and same
    assert report.method_choice == "automatic: 'flap' cannot apply, so 'wanda'"
    assert len(report.notes) == 1 and report.notes[0].startswith("`method`=None: 'flap' cannot apply")


class ConvMlpBlock(nn.Module):
    """A timm ConvMlp-style block: 1×1 convolutions `mlp.fc1` / `mlp.fc2` (MLP neurons are filters)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Conv2d(4, 8, 1)
        self.mlp.fc2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([ConvMlpBlock(), ConvMlpBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_cnn_falls_back_to_filter_magnitude_warned_and_noted() -> None:
    automatic, explicit = ConvNet(), ConvNet()
    batches = list(torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(2)))
    with pytest.warns(UserWarning, match=r"'flap' cannot apply \(.*Conv2d.*\); using 'magnitude'"):
        report = prune_structured(automatic, batches, mlp_sparsity=0.5)
    prune_structured(explicit, batches, mlp_sparsity=0.5, method="magnitude")
    assert report.method == "magnitude" and _same(_state(automatic), _state(explicit))
    assert report.method_choice == "automatic: 'flap' cannot apply, so 'magnitude'" and len(report.notes) == 1
    assert report.kept == {"layers.0.mlp": (4, 8), "layers.1.mlp": (4, 8)}


def test_method_options_need_an_explicit_method() -> None:
    with pytest.raises(ValueError, match=r"`method_options`=\{'compensate': False\} needs an explicit `method`"):
        prune_structured(tiny_llama(), _tokens(tiny_llama()), mlp_sparsity=0.5, method_options={"compensate": False})
    with pytest.raises(ValueError, match=r"`method_options`=\{'p': 2\} needs an explicit `method`"):
        StructuredPruning(mlp_sparsity=0.5, method_options={"p": 2})


class ForwardLM(TinyCausalLM):
    def forward(self, batch: torch.Tensor) -> Any:
        return self.model(input_ids=batch)


def test_structured_pruning_in_a_fit_chooses_flap_and_its_biases_train() -> None:
    """The automatic choice inside a fit was Wanda on Llama (FLAP's bias would have come after the optimizer):
    `setup` now adds the biases before `configure_optimizers`, so FLAP runs and its biases are trained."""
    module = ForwardLM(tiny_llama())
    callback = StructuredPruning(mlp_sparsity=0.5, num_samples=4, compact_on_end=False)
    trainer = make_trainer(max_steps=2, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*'flap' cannot apply")
        trainer.fit(module)
    assert callback.report is not None and callback.report.method == "flap"
    assert callback.report.method_choice.startswith("automatic: calibration batches given, so 'flap'")
    bias = module.model.model.layers[0].mlp.down_proj.bias
    assert bias is not None and callback.report.added_parameters  # added in `setup`, listed in the report
    assert any(p is bias for group in trainer.optimizers[0].param_groups for p in group["params"])
