"""The `lightning-prune` command as users run it: bad configurations from the shell, and the
wheel (configs and recipes inside) installed into a fresh virtual environment; the wheel ships every
config file and the repository tracks no symlink (the configs used to reach the package through two)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
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
    "sparsity 1.5": (
        ["pruning.sparsity=1.5"],
        2,
        "`pruning.sparsity`=1.5 (lightning_prune.GradualPruning): `sparsity` must be a number in [0, 1), got 1.5",
    ),
    "missing model path": (
        ["recipe=gmp_finetune", "model=causal_lm", "model.model_path=/no/such/model"],
        2,
        "`model.model_path`='/no/such/model' (lightning_prune.models.CausalLMModule): "
        "`model_path`='/no/such/model' is not a local model directory",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """All bad configurations, started at once (each process pays the import time)."""
    out = tmp_path_factory.mktemp("bad")
    processes = {
        name: subprocess.Popen(
            [command(), *args, f"output_dir={out / str(i)}"],
            cwd=out,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, (name, (args, _, _)) in enumerate(BAD_CONFIGS.items())
    }
    return {
        name: subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate())
        for name, p in processes.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_configuration_exits_with_one_clear_message(bad_runs: dict, name: str) -> None:
    _, code, message = BAD_CONFIGS[name]
    result = bad_runs[name]
    assert result.returncode == code, result.stderr
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `python -m build` makes from a copy of the sources (so no build/ lands in the
    repository), built once for this module. No isolation: the tests run offline, with the running
    environment's setuptools (its `wheel` requirement is skipped: setuptools ≥ 70.1 builds wheels itself)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "lightning_prune", source / "lightning_prune", ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check"]
    result = subprocess.run([*build, "--outdir", str(tmp / "dist"), str(source)], text=True, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (tmp / "dist").glob("lightning_prune-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_every_config_file(wheel: Path) -> None:
    conf = REPO / "lightning_prune" / "conf"
    in_source = sorted(path.relative_to(REPO).as_posix() for path in conf.rglob("*.yaml"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(name for name in archive.namelist() if name.startswith("lightning_prune/conf/"))
        assert all(archive.read(name) == (REPO / name).read_bytes() for name in shipped)
    assert shipped == in_source
    recipes = {Path(name).stem for name in shipped if name.startswith("lightning_prune/conf/recipe/")}
    assert {"lightning_prune/conf/config.yaml", "lightning_prune/conf/oneshot_base.yaml"} <= set(shipped)
    assert {"quickstart", "gmp_finetune", "wanda_2of4", "sparsegpt_50", "minilm_2of4_distill"} <= recipes
    assert recipes == {path.stem for path in (conf / "recipe").glob("*.yaml")}


def test_git_tracks_no_symlink() -> None:
    """A symlink breaks a checkout without symlinks (core.symlinks=false) and the configs' install."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO, text=True, capture_output=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
        pytest.skip("not a git checkout of the repository")
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, check=True, text=True, capture_output=True).stdout
    links = [line.split("\t", 1)[1] for line in listed.splitlines() if line.startswith("120000 ")]
    assert len(listed.splitlines()) > 100  # the index was read
    assert links == []


def venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """Install the wheel (no deps) into a fresh venv that sees the running environment's packages."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # running inside a venv: its packages are the "system" ones to see
        venv_site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            text=True,
            capture_output=True,
        ).stdout.strip()
        Path(venv_site, "outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    return venv


@pytest.mark.slow
def test_installed_wheel_runs_help_and_a_sweep(wheel: Path, tmp_path: Path) -> None:
    venv = venv_with_wheel(tmp_path, wheel)
    env = {
        key: value for key, value in os.environ.items() if key != "PYTHONPATH"
    }  # the wheel's package, not a source tree
    show_dir = [venv / "bin" / "python", "-c", "import lightning_prune.cli as c; print(c.CONFIG_DIR)"]
    where = subprocess.run(show_dir, cwd=tmp_path, env=env, check=True, text=True, capture_output=True).stdout.strip()
    assert where.startswith(str(venv)) and Path(where, "recipe", "quickstart.yaml").is_file()
    assert Path(where).parent.joinpath("py.typed").is_file()  # PEP 561 marker shipped in the wheel
    cli = str(venv / "bin" / "lightning-prune")
    shown = subprocess.run([cli, "--help"], cwd=tmp_path, env=env, check=True, text=True, capture_output=True).stdout
    (recipes,) = [line for line in shown.splitlines() if line.startswith("recipe: ")]
    assert {"gmp_finetune", "iterative_lottery", "quickstart"} <= set(recipes[len("recipe: ") :].split(", "))
    assert "pruning: " in shown and "lora: " in shown and "export: " in shown
    (pruning,) = [line for line in shown.splitlines() if line.startswith("pruning: ")]
    options = set(pruning[len("pruning: ") :].split(", "))
    assert {"wanda", "sparsegpt", "ria"} <= options and "oneshot_base" not in options  # the base is no option
    sweep = tmp_path / "sweep"
    overrides = [
        "recipe=quickstart",
        "pruning.sparsity=0.5,0.75",
        "save_model=false",
        f"hydra.sweep.dir={sweep}",
        *TINY,
    ]
    subprocess.run([cli, "-m", *overrides], cwd=tmp_path, env=env, check=True, text=True, capture_output=True)
    found = sorted(json.loads((sweep / job / "results.json").read_text())["global_sparsity"] for job in ("0", "1"))
    assert found == pytest.approx([0.5, 0.75], abs=1e-4)
    assert (sweep / "0" / "config.yaml").is_file() and (sweep / "0" / "sparsity_report.md").is_file()
