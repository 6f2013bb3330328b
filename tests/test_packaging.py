"""A `pip install` of the wheel, not the checkout: the recipes, accelerate configs and sample data ship inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.sft import resolve_recipe


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from a copy of the checkout (the build leaves its `build/` there, not in the checkout), and
    the build's log."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("safekey_trl", "recipes", "data"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", str(source)]
    result = subprocess.run([*command, "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel_file,) = out.glob("safekey_trl-*.whl")
    return wheel_file, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(wheel_build) -> Path:
    return wheel_build[0]


def test_the_build_warns_of_nothing(wheel_build):
    """No setuptools warning at install: `license` is an SPDX string, and the templates are a package of their own
    (setuptools would otherwise ignore them, one day)."""
    log = wheel_build[1]
    assert "Warning" not in log.replace("byte-compiling is disabled", ""), [
        line for line in log.splitlines() if "Warning" in line
    ]


def test_the_wheel_ships_the_recipes_configs_and_sample_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {path.name for path in (ROOT / "recipes").glob("*.yaml")}
    configs = {path.name for path in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    assert len(recipes) == 11 and len(configs) == 5
    assert {f"safekey_trl/recipes/{name}" for name in recipes} <= names
    assert {f"safekey_trl/recipes/accelerate/{name}" for name in configs} <= names
    assert "safekey_trl/sample_data/safekey_sample.jsonl" in names
    templates = {path.name for path in (ROOT / "safekey_trl" / "templates").glob("*.jinja")}
    assert len(templates) == 3 and {f"safekey_trl/templates/{name}" for name in templates} <= names
    # every module of the checkout, subpackages included (the package list in pyproject.toml is explicit)
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "safekey_trl").rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_an_installed_wheel_lists_its_recipes_and_trains_from_another_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Without PYTHONPATH: a checkout on it (with its egg-info) would make pip take safekey-trl as already installed
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The third-party packages come from the test's own environment, through a path line: that directory's own .pth
    # files (an editable safekey-trl among them) are not run, so safekey_trl can only come from the wheel
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site_packages / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*arguments: str) -> subprocess.CompletedProcess:
        command = [str(venv / "bin" / "safekey-trl"), *arguments]
        return subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    listed = run("recipes")
    assert listed.returncode == 0, listed.stderr[-3000:]
    # The recipes are the wheel's, so the safekey_trl that runs is the wheel's
    assert f"recipes ({site_packages / 'safekey_trl' / 'recipes'})" in listed.stdout
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.startswith("  ")}
    assert "tiny:qwen2" in lines["tiny"] and "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in lines["qwen7b"]
    assert {"ddp", "zero2", "zero3", "zero3_offload", "fsdp"} <= set(lines)

    out = tmp_path / "run"
    trained = run("train", "--recipe", "tiny", "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(out))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert str(site_packages / "safekey_trl" / "sample_data" / "safekey_sample.jsonl") in trained.stderr
    assert (out / "model.safetensors").is_file() and (out / "safekey_head.safetensors").is_file()


def test_a_recipe_in_the_current_directory_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    own = tmp_path / "recipes" / "tiny.yaml"
    own.write_text("model_name_or_path: tiny:qwen2\nlearning_rate: 0.25\n")
    assert resolve_recipe("tiny") == Path("recipes") / "tiny.yaml"
    assert resolve_recipe(str(ROOT / "recipes" / "qwen7b.yaml")) == ROOT / "recipes" / "qwen7b.yaml"
    assert resolve_recipe("qwen7b") == ROOT / "recipes" / "qwen7b.yaml"


def test_recipes_command_lists_the_checkout_recipes():
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    assert f"recipes ({ROOT / 'recipes'})" in result.output
    assert all(f"  {path.stem} " in result.output for path in (ROOT / "recipes").glob("*.yaml"))
