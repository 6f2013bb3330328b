"""Training moves the right weights on the right schedule; checkpoints carry the head; the export is clean."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_config, make_trainer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from safekey_trl import DualPathSafetyHead, SafeKeySFTTrainer
from safekey_trl.heads import HEAD_WEIGHTS_NAME


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_training_moves_head_weights_and_biases_and_the_model(tmp_path, make_model, tokenizer, examples):
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples)
    head_before, model_before = snapshot(trainer.safety_head), snapshot(model.model)
    trainer.train()
    for name, value in trainer.safety_head.state_dict().items():
        assert not torch.equal(value, head_before[name]), f"head parameter {name} did not train"
    assert not torch.equal(model.model.embed_tokens.weight, model_before["embed_tokens.weight"])
    logged = trainer.state.log_history[0]
    for key in (
        "loss",
        "lm_loss",
        "qmm_loss",
        "head_loss",
        "head_accuracy",
        "qmm_key_accuracy",
        "mean_token_accuracy",
    ):
        assert key in logged, f"{key} not logged"
    # The total is the weighted sum of the terms logged beside it
    assert logged["loss"] == pytest.approx(
        logged["lm_loss"] + 0.2 * logged["qmm_loss"] + 0.2 * logged["head_loss"], rel=1e-4
    )


def test_auxiliary_terms_only_in_the_last_epochs(tmp_path, make_model, tokenizer, examples):
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples, num_train_epochs=3, auxiliary_epochs=1)
    head_before = snapshot(trainer.safety_head)
    head_after_epoch = {}

    class RecordHead:  # a callback reading the head at each epoch's end
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

        def on_epoch_end(self, args, state, control, **kwargs):
            head_after_epoch[round(state.epoch)] = snapshot(trainer.safety_head)

    trainer.add_callback(RecordHead())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "lm_loss" in entry]
    assert [("qmm_loss" in entry, "head_loss" in entry) for entry in logs] == [(False, False)] * 4 + [(True, True)] * 2
    for epoch in (1, 2):  # plain SFT: the head is untouched
        assert all(torch.equal(head_after_epoch[epoch][k], v) for k, v in head_before.items())
    assert not torch.equal(head_after_epoch[3]["understanding_head.bias"], head_before["understanding_head.bias"])


def test_no_key_in_batch_runs_no_second_pass(tmp_path, make_model, tokenizer, examples):
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples, max_length=20)  # every K is cut
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("input_ids").shape), with_kwargs=True
    )
    trainer.train()
    assert len(calls) == trainer.state.global_step  # the main pass only
    assert not any("qmm_loss" in entry for entry in trainer.state.log_history)


def _train_state(trainer: SafeKeySFTTrainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def test_resume_restores_the_head_and_matches_an_uninterrupted_run(tmp_path, make_model, tokenizer, examples):
    settings = dict(num_train_epochs=2, auxiliary_epochs=2, save_strategy="steps", save_steps=2)
    full = make_trainer(tmp_path / "full", make_model(), tokenizer, examples, **settings)
    full.train()
    expected = _train_state(full)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / HEAD_WEIGHTS_NAME).is_file()
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:
        assert not any("safekey_head" in key for key in weights.keys())

    # A fresh run with a differently initialised head must pick up the checkpoint's
    torch.manual_seed(123)
    resumed = SafeKeySFTTrainer(
        make_model(),
        full.args,
        train_dataset=examples,
        processing_class=tokenizer,
        safety_head=DualPathSafetyHead(64),
    )
    resumed.args.output_dir = str(tmp_path / "resumed")
    resumed._load_from_checkpoint(str(checkpoint))
    saved_head = DualPathSafetyHead.from_pretrained(checkpoint)
    for name, value in saved_head.state_dict().items():
        assert torch.equal(resumed.safety_head.state_dict()[name], value)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 4
    for name, value in _train_state(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_a_checkpoint_without_head_is_an_error(tmp_path, make_model, tokenizer, examples):
    trainer = make_trainer(
        tmp_path, make_model(), tokenizer, examples, save_strategy="steps", save_steps=1, max_steps=1
    )
    trainer.train()
    (tmp_path / "checkpoint-1" / HEAD_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no safekey_head.safetensors"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))


def test_final_export_is_a_clean_causal_lm_with_the_head_beside_it(tmp_path, make_model, tokenizer, examples):
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert not any("safekey_head" in key for key in weights.keys())
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not hasattr(loaded, "safekey_head")
    ids = torch.tensor([[1, 5, 9, 17]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(input_ids=ids).logits)
    head = DualPathSafetyHead.from_pretrained(out)
    for name, value in trainer.safety_head.state_dict().items():
        assert torch.equal(head.state_dict()[name], value)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"


def test_trainer_rejects_a_dataset_without_safekey_features(tmp_path, make_model, tokenizer):
    from datasets import Dataset

    with pytest.raises(ValueError, match="lacks the SafeKey feature column"):
        make_trainer(tmp_path, make_model(), tokenizer, Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]]}))


def test_config_rejects_packing_and_bad_weights(tmp_path):
    with pytest.raises(ValueError, match="packing=False"):
        make_config(tmp_path, packing=True)
    with pytest.raises(ValueError, match="head_theta"):
        make_config(tmp_path, head_theta=1.5)
    with pytest.raises(ValueError, match="qmm_weight"):
        make_config(tmp_path, qmm_weight=-0.1)


def test_gradient_checkpointing_gives_the_same_loss_and_trains_the_head(tmp_path, make_model, tokenizer, examples):
    losses = {}
    for checkpointing in (False, True):
        model = make_model()
        trainer = make_trainer(
            tmp_path, model, tokenizer, examples, activation_checkpointing=checkpointing, max_steps=1
        )
        head_before = snapshot(trainer.safety_head)
        trainer.train()
        assert trainer.model.is_activation_checkpointing == checkpointing
        losses[checkpointing] = trainer.state.log_history[0]["loss"]
        assert not torch.equal(trainer.safety_head.prefix_head.bias, head_before["prefix_head.bias"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_model_without_a_name_needs_a_tokenizer(tmp_path, make_model, examples):
    with pytest.raises(ValueError, match="pass `processing_class`"):
        SafeKeySFTTrainer(make_model(), make_config(tmp_path), train_dataset=examples)


def test_query_masked_pass_runs_only_rows_with_k_up_to_the_last_k_token(tmp_path, make_model, tokenizer, examples):
    from helpers import first_batch

    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples)
    batch = first_batch(trainer)
    batch["key_mask"][1] = 0  # row 1: K cut by truncation
    shapes = []  # of the backbone's inputs: the main pass, then the query-masked one (inside the same model call)
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    trainer.compute_loss(model, dict(batch))
    last_key_token = max(int(row.nonzero().max()) for row in batch["key_mask"] if row.any())
    assert shapes == [tuple(batch["input_ids"].shape), (3, last_key_token + 1)]
    assert last_key_token + 1 < batch["input_ids"].shape[1]


def test_a_zero_weight_term_is_neither_run_nor_logged(tmp_path, make_model, tokenizer, examples):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, examples, head_weight=0.0, max_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "qmm_loss" in logged and "head_loss" not in logged and "head_accuracy" not in logged
    assert logged["loss"] == pytest.approx(logged["lm_loss"] + 0.2 * logged["qmm_loss"], rel=1e-4)
