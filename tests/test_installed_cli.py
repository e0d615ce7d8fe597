"""The `lightning-prune` command as users run it: bad configurations from the shell, and the
wheel (configs and recipes inside) installed into a fresh virtual environment."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "dense_epochs=0",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "plots=false",
    "tensorboard=false",
]


def command() -> str:
    """The console script of the running environment (the editable install)."""
    script = Path(sysconfig.get_path("scripts")) / "lightning-prune"
    found = str(script) if script.exists() else shutil.which("lightning-prune")
    assert found, "the `lightning-prune` console script is not installed (pip install -e .)"
    return found


# (arguments, exit code, message that names the key and the value)
BAD_CONFIGS = {
    "unknown recipe": (["recipe=nope"], 1, "Could not find 'recipe/nope'"),
    "wrong type": (["trainer.max_epochs=abc"], 2, "`trainer.max_epochs`='abc' has the wrong type"),
    "sparsity 1.5": (["pruning.sparsity=1.5"], 2, "`pruning.sparsity`=1.5 (lightning_prune.GradualPruning): `sparsity` must be a number in [0, 1), got 1.5"),
    "missing model path": (
        ["recipe=gmp_finetune", "model=causal_lm", "model.model_path=/no/such/model"],
        2,
        "`model.model_path`='/no/such/model' (lightning_prune.models.CausalLMModule): `model_path`='/no/such/model' is not a local model directory",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """All bad configurations, started at once (each process pays the import time)."""
    out = tmp_path_factory.mktemp("bad")
    processes = {
        name: subprocess.Popen([command(), *args, f"output_dir={out / str(i)}"], cwd=out, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i, (name, (args, _, _)) in enumerate(BAD_CONFIGS.items())
    }
    return {name: subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for name, p in processes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_configuration_exits_with_one_clear_message(bad_runs: dict, name: str) -> None:
    _, code, message = BAD_CONFIGS[name]
    result = bad_runs[name]
    assert result.returncode == code, result.stderr
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def venv_with_wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the sources and install it (no deps) into a fresh venv."""
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "lightning_prune", source / "lightning_prune", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(source)], check=True)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # running inside a venv: its packages are the "system" ones to see
        venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True, text=True, capture_output=True).stdout.strip()
        Path(venv_site, "outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next((tmp / "dist").glob("lightning_prune-*.whl"))
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    return venv


@pytest.mark.slow
def test_installed_wheel_runs_help_and_a_sweep(tmp_path: Path) -> None:
    venv = venv_with_wheel(tmp_path)
    where = subprocess.run([venv / "bin" / "python", "-c", "import lightning_prune.cli as c; print(c.CONFIG_DIR)"], cwd=tmp_path, check=True, text=True, capture_output=True).stdout.strip()
    assert where.startswith(str(venv)) and Path(where, "recipe", "quickstart.yaml").is_file()
    assert Path(where).parent.joinpath("py.typed").is_file()  # PEP 561 marker shipped in the wheel
    cli = str(venv / "bin" / "lightning-prune")
    shown = subprocess.run([cli, "--help"], cwd=tmp_path, check=True, text=True, capture_output=True).stdout
    (recipes,) = [line for line in shown.splitlines() if line.startswith("recipe: ")]
    assert {"gmp_finetune", "iterative_lottery", "quickstart"} <= set(recipes[len("recipe: ") :].split(", "))
    assert "pruning: " in shown and "lora: " in shown and "export: " in shown
    sweep = tmp_path / "sweep"
    subprocess.run([cli, "-m", "recipe=quickstart", "pruning.sparsity=0.5,0.75", "save_model=false", f"hydra.sweep.dir={sweep}", *TINY], cwd=tmp_path, check=True, text=True, capture_output=True)
    found = sorted(json.loads((sweep / job / "results.json").read_text())["global_sparsity"] for job in ("0", "1"))
    assert found == pytest.approx([0.5, 0.75], abs=1e-4)
    assert (sweep / "0" / "config.yaml").is_file() and (sweep / "0" / "sparsity_report.md").is_file()
