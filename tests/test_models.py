"""Demo LightningModules: shapes, metrics, fused AdamW, HF round trip, argument errors."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_prune.models import CausalLMModule, ClassifierModule, build_digits_net, make_adamw, with_lr_schedule
from lightning_prune.models.optim import lr_factor
from tests.conftest import tiny_llama_config

TINY_LLAMA = tiny_llama_config(vocab_size=50, max_position_embeddings=16)


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_digits_nets_map_64_features_to_classes(arch: str) -> None:
    net = build_digits_net(arch, hidden=16)
    assert net(torch.randn(3, 64)).shape == (3, 10)
    assert isinstance(net.classifier, nn.Linear)


def test_classifier_accuracy_is_fraction_correct() -> None:
    module = ClassifierModule(model=nn.Identity(), num_classes=3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    module.val_accuracy.update(logits, torch.tensor([0, 1, 2, 2]))
    assert float(module.val_accuracy.compute()) == pytest.approx(0.75)


def test_adamw_is_fused_on_cpu_and_skips_frozen() -> None:
    frozen, trained = nn.Parameter(torch.ones(2), requires_grad=False), nn.Parameter(torch.ones(2))
    optimizer = make_adamw([frozen, trained], lr=0.1)
    assert optimizer.defaults["fused"] is True
    assert optimizer.param_groups[0]["params"] == [trained]
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_adamw([frozen], lr=0.1)


def test_causal_lm_perplexity_is_exp_of_loss(tmp_path) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY_LLAMA)
    batch = {"input_ids": torch.randint(0, 50, (2, 8))}
    module.validation_step(batch, 0)
    loss = module.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    assert float(module.val_perplexity.compute()) == pytest.approx(float(loss.detach().exp()), rel=1e-4)
    module.model.save_pretrained(tmp_path)
    reloaded = CausalLMModule(model_path=str(tmp_path))
    assert torch.equal(reloaded(batch["input_ids"]), module(batch["input_ids"]))


def test_causal_lm_padding_is_never_a_target() -> None:
    """val/ppl and the loss count exactly the tokens evaluate_perplexity counts: a padded batch (labels
    = the ids, attention_mask 0 on the padding) scores as its rows alone."""
    from lightning_prune import evaluate_perplexity

    torch.manual_seed(0)
    module = CausalLMModule(config=TINY_LLAMA).eval()
    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
    }
    with torch.no_grad():
        module.validation_step(padded, 0)
        loss, _, labels = module._loss_and_logits(padded)
    expected = evaluate_perplexity(module.model, [torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13]])])
    assert expected.tokens == 5 + 2 and int((labels[:, 1:] != -100).sum()) == 7
    assert float(module.val_perplexity.compute()) == pytest.approx(expected.ppl, rel=1e-5)
    assert float(loss) == pytest.approx(expected.nll, rel=1e-5)


def test_causal_lm_trains_one_step() -> None:
    module = CausalLMModule(config=TINY_LLAMA, lr=1e-2)
    data = [{"input_ids": torch.randint(0, 50, (8,))} for _ in range(4)]
    before = module.model.model.layers[0].mlp.up_proj.weight.clone()
    trainer(max_steps=1).fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert not torch.equal(before, module.model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_path": "/no/such/model"}, "`model_path`='/no/such/model' is not a local model directory"),
        ({}, "exactly one of `model_path`, `gguf_file` or `config`"),
        ({"gguf_file": "/no/such.gguf"}, "`gguf_file`=./no/such.gguf. is not a file"),
        ({"gguf_file": "a.gguf", "config": TINY_LLAMA}, "give `gguf_file` or `config`, not both"),
        ({"pretrained": "gpt5"}, "`pretrained` must be one of \\[.smollm2.\\] or null, got .gpt5."),
        ({"config": {"hidden_size": 8}}, "needs a `model_type`"),
        ({"config": TINY_LLAMA, "dtype": "floaty"}, "`dtype` must name a torch dtype"),
        ({"config": TINY_LLAMA, "lr": 0.0}, "`lr` must be > 0"),
    ],
)
def test_causal_lm_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**kwargs)


def test_classifier_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`arch` must be one of"):
        ClassifierModule(arch="rnn")
    with pytest.raises(ValueError, match="`num_classes` must be"):
        ClassifierModule(num_classes=1)


def test_lr_schedule_warms_up_then_decays_linearly_to_zero_and_is_off_by_default() -> None:
    weight = nn.Parameter(torch.ones(2))
    optimizer = make_adamw([weight], lr=0.1)
    assert with_lr_schedule(optimizer, "constant", 0, 100) is optimizer  # no scheduler: what LoRARecovery needs
    config = with_lr_schedule(optimizer, "linear", 2, 4)
    assert config["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["lr_scheduler"]["scheduler"].step()
    assert seen == pytest.approx([0.05, 0.1 * 0.75, 0.1 * 0.5, 0.1 * 0.25, 0.0])
    assert [lr_factor(step, "constant", 4, 10) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("schedule", "warmup", "total", "match"),
    [
        ("cosine", 0, 10, "`lr_schedule` must be one of"),
        ("linear", -1, 10, "`warmup_steps` must be"),
        ("linear", 1.5, 10, "`warmup_steps` must be"),
        ("linear", 0, float("inf"), "no end"),
    ],
)
def test_lr_schedule_errors_name_the_argument(schedule: str, warmup: object, total: float, match: str) -> None:
    optimizer = make_adamw([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        with_lr_schedule(optimizer, schedule, warmup, total)  # type: ignore[arg-type]
