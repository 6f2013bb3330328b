"""Auto-resume: the last checkpoint of output_dir is found; one written with other SafeKey settings is refused."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import make_trainer

from safekey_trl.resume import SAFEKEY_SETTINGS_NAME, resolve_resume_from_checkpoint


def test_resolve_picks_the_newest_checkpoint_by_step_not_by_name(tmp_path):
    for step in (2, 9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    for value in (True, "true", "auto", "AUTO"):
        assert resolve_resume_from_checkpoint(value, tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_from_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path) == str(tmp_path / "checkpoint-2")
    for value in (None, False, "false"):
        assert resolve_resume_from_checkpoint(value, tmp_path) is None


def test_auto_resume_without_a_checkpoint_starts_fresh_with_a_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="safekey_trl.resume"):
        assert resolve_resume_from_checkpoint("auto", tmp_path / "not-yet") is None
    assert "no checkpoint in" in caplog.text and "starting fresh" in caplog.text


def _run_with_checkpoints(tmp_path, make_model, tokenizer, examples, **overrides):
    settings = dict(save_strategy="steps", save_steps=1, max_steps=2, **overrides)
    trainer = make_trainer(tmp_path, make_model(), tokenizer, examples, **settings)
    trainer.train()
    return trainer


def test_auto_resume_continues_from_the_last_checkpoint(tmp_path, make_model, tokenizer, examples):
    _run_with_checkpoints(tmp_path, make_model, tokenizer, examples)
    saved = json.loads((tmp_path / "checkpoint-2" / SAFEKEY_SETTINGS_NAME).read_text())
    assert saved.pop("run")["final"]["lm_loss"] > 0  # what the model card states, beside the settings
    assert saved == {
        "qmm_weight": 0.2,
        "head_weight": 0.2,
        "head_theta": 0.5,
        "auxiliary_epochs": 1,
        "qmm_mask_query": True,
        "head_detach_hidden": False,
    }
    resumed = make_trainer(
        tmp_path, make_model(), tokenizer, examples, save_strategy="no", max_steps=3, resume_from_checkpoint="auto"
    )
    loaded = []
    original = resumed._load_from_checkpoint
    resumed._load_from_checkpoint = lambda path, model=None: (loaded.append(path), original(path, model))
    resumed.train(resume_from_checkpoint=resumed.args.resume_from_checkpoint)
    assert loaded == [str(tmp_path / "checkpoint-2")]
    assert resumed.state.global_step == 3


def test_resume_refuses_a_checkpoint_with_other_safekey_settings(tmp_path, make_model, tokenizer, examples):
    _run_with_checkpoints(tmp_path, make_model, tokenizer, examples)
    other = make_trainer(tmp_path, make_model(), tokenizer, examples, max_steps=3, head_theta=0.3, qmm_weight=0.0)
    with pytest.raises(
        ValueError, match=r"qmm_weight: checkpoint 0\.2, now 0\.0; head_theta: checkpoint 0\.5, now 0\.3"
    ):
        other.train(resume_from_checkpoint=True)
    # lm_head_kernel is not an objective setting: both kernels give the same loss
    same = make_trainer(tmp_path, make_model(), tokenizer, examples, max_steps=3, lm_head_kernel="trl")
    same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 3
