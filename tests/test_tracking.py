"""Tracking: paper-size recipes report to trackio, SafeKey's terms go to their own panel, a missing tracker fails
at start-up with how to install it."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
from helpers import make_trainer
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.sft import parse_recipe
from safekey_trl.tracking import check_trackers_installed, tracker_key

PAPER_RECIPES = ["qwen7b", "llama8b", "qwen14b", "qwen7b-qlora", "llama8b-qlora", "qwen14b-qlora"]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_report_to_trackio_and_wandb_is_one_override_away(name):
    # Parsed here without a GPU: bf16 needs one unless `use_cpu` is set
    _, training_args, _ = parse_recipe(name, ["--use_cpu", "true"])
    assert training_args.report_to == ["trackio"] and training_args.project == "safekey"
    _, training_args, _ = parse_recipe(name, ["--use_cpu", "true", "--report_to", "wandb"])
    assert training_args.report_to == ["wandb"]


@pytest.mark.parametrize("name", ["tiny", "tiny-qlora"])
def test_tiny_recipes_stay_offline(name):
    assert parse_recipe(name)[1].report_to == []


def test_tracker_keys():
    assert tracker_key("train/qmm_loss") == "safekey/qmm_loss"
    assert tracker_key("train/head_accuracy") == "safekey/head_accuracy"
    assert tracker_key("eval/head_loss") == "safekey_eval/head_loss"
    assert tracker_key("train/loss") == "train/loss" and tracker_key("train/global_step") == "train/global_step"


@pytest.fixture
def fake_trackio(monkeypatch):
    """A stand-in `trackio` module recording what the transformers callback logs."""
    logged: list[dict] = []
    module = types.ModuleType("trackio")
    module.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    module.__version__ = "0.43.0"
    module.init = lambda **kwargs: None
    module.log = lambda data, *args, **kwargs: logged.append(dict(data))
    module.finish = lambda: None
    module.config = {}
    module.context_vars = types.SimpleNamespace(current_space_id=types.SimpleNamespace(get=lambda: None))
    monkeypatch.setitem(sys.modules, "trackio", module)
    return logged


def test_safekey_terms_are_logged_to_their_own_panel(tmp_path, make_model, tokenizer, examples, fake_trackio):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, examples, report_to=["trackio"], max_steps=1)
    trainer.train()
    step_logs = [data for data in fake_trackio if "train/loss" in data]
    assert step_logs, fake_trackio
    for name in ("lm_loss", "qmm_loss", "qmm_key_accuracy", "head_loss", "head_accuracy"):
        assert f"safekey/{name}" in step_logs[0] and f"train/{name}" not in step_logs[0]
    assert step_logs[0]["safekey/qmm_loss"] == trainer.state.log_history[0]["qmm_loss"]
    # The console and log_history keep the plain names
    assert "qmm_loss" in trainer.state.log_history[0]


def test_a_missing_tracker_fails_at_start_up_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'safekey-trl\[track\]'"):
        check_trackers_installed(["trackio"])
    check_trackers_installed(["none"])
    loaded = []
    monkeypatch.setattr("safekey_trl.sft.load_model_and_tokenizer", lambda *a, **k: loaded.append(a))
    result = CliRunner().invoke(
        app, ["train", "--recipe", "tiny", "--report_to", "trackio", "--output_dir", str(tmp_path)]
    )
    assert result.exit_code == 2 and "safekey-trl[track]" in result.output and "--report_to none" in result.output
    assert loaded == []  # no model was loaded
