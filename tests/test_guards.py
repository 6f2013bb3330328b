"""What `SFTConfig` lets a user switch on either works with SafeKey or stops at start-up with a clear message."""

from __future__ import annotations

import pytest
import torch
from accelerate.parallelism_config import ParallelismConfig
from helpers import first_batch, make_config, make_trainer

from safekey_trl.config import refuse_sequence_sharding


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(padding_free=True), "does not support `packing` or `padding_free`"),
        (dict(packing=True), "does not support `packing` or `padding_free`"),
        (dict(use_liger_kernel=True), "does not support `use_liger_kernel`"),
        (dict(assistant_only_loss=True), "`assistant_only_loss` does not apply to SafeKey"),
        (dict(completion_only_loss=False), "`completion_only_loss=False` cannot be honoured"),
        (dict(parallelism_config=ParallelismConfig(cp_size=2)), "does not support context parallelism (cp_size=2)"),
        (
            dict(parallelism_config=ParallelismConfig(sp_size=2, sp_backend="deepspeed")),
            "does not support sequence parallelism (sp_size=2)",
        ),
    ],
)
def test_config_refuses_what_safekey_cannot_train_with(tmp_path, setting, message):
    with pytest.raises(ValueError) as error:
        make_config(tmp_path, **setting)
    assert message in str(error.value)


@pytest.mark.parametrize("setting", [dict(completion_only_loss=None), dict(completion_only_loss=True), dict()])
def test_config_accepts_what_safekey_already_does(tmp_path, setting):
    make_config(tmp_path, **setting)


def test_plain_parallelism_passes():
    refuse_sequence_sharding(None)
    refuse_sequence_sharding(ParallelismConfig(tp_size=1, cp_size=1))


def test_trainer_refuses_context_parallelism_set_by_an_accelerate_config(
    tmp_path, monkeypatch, make_model, tokenizer, examples
):
    # What `accelerate launch` with `parallelism_config: {cp_size: 2}` in its YAML gives: `args` never sees it, only
    # the accelerator does (a one-process run cannot build a real one: it is set once the accelerator exists)
    from transformers import Trainer

    create = Trainer.create_accelerator_and_postprocess

    def create_with_context_parallelism(self):
        create(self)
        monkeypatch.setattr(self.accelerator.state, "parallelism_config", ParallelismConfig(cp_size=2), raising=False)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create_with_context_parallelism)
    with pytest.raises(ValueError, match=r"does not support context parallelism \(cp_size=2\)"):
        make_trainer(tmp_path, make_model(), tokenizer, examples)


def test_activation_offloading_context_covers_the_query_masked_pass(tmp_path, make_model, tokenizer, examples):
    """TRL runs `training_step` inside its activation-offloading context (saved-tensor hooks), and SafeKey's second
    forward runs inside `compute_loss`: every tensor saved for backward by both passes goes through the hooks."""
    packed = {}

    def count_tensors_saved(trainer) -> int:
        count = [0]

        def pack(tensor):
            count[0] += 1
            return tensor

        trainer.maybe_activation_offload_context = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        trainer.current_gradient_accumulation_steps = 1
        batch = first_batch(trainer)
        trainer.training_step(trainer.model, batch, trainer._get_num_items_in_batch([batch], trainer.args.device))
        return count[0]

    for qmm_weight in (0.0, 0.2):
        trainer = make_trainer(tmp_path, make_model(), tokenizer, examples, qmm_weight=qmm_weight, head_weight=0.0)
        packed[qmm_weight] = count_tensors_saved(trainer)
    # The query-masked pass runs the whole model again: at least as many saved tensors as one layer stack
    assert packed[0.2] > 1.5 * packed[0.0] > 0


@pytest.fixture
def deepspeed_enabled(monkeypatch):
    """Trainers built in the test take themselves for DeepSpeed runs (the start-up checks read only the flag)."""
    from transformers import Trainer

    create = Trainer.create_accelerator_and_postprocess

    def create_with_deepspeed(self):
        create(self)
        self.is_deepspeed_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create_with_deepspeed)


@pytest.mark.usefixtures("deepspeed_enabled")
def test_trainer_refuses_reentrant_checkpointing_under_deepspeed(tmp_path, make_model, tokenizer, examples):
    # ZeRO reduces each gradient once: with reentrant checkpointing the query-masked pass's second use of the layers
    # reduces them again ("already been reduced" under ZeRO-2, a bucket assertion under ZeRO-3). DDP is refused the
    # same way, for the same reason, in test_distributed (a launch); FSDP2 trains with it.
    reentrant = dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="DeepSpeed cannot train SafeKey with reentrant gradient checkpointing"):
        make_trainer(tmp_path, make_model(), tokenizer, examples, **reentrant)
    make_trainer(tmp_path, make_model(), tokenizer, examples, activation_checkpointing=True)  # non-reentrant: fine


@pytest.mark.usefixtures("deepspeed_enabled")
def test_trainer_refuses_skipping_non_finite_steps_under_deepspeed(tmp_path, make_model, tokenizer, examples):
    # DeepSpeed's engine steps the optimizer inside the backward pass, before the step's check could skip it; the
    # refusal is listed with the other reasons the run cannot train as configured
    reentrant = dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError) as caught:
        make_trainer(tmp_path, make_model(), tokenizer, examples, non_finite_loss="skip", **reentrant)
    message = str(caught.value)
    assert message.startswith("This run cannot train as configured:\n- ")
    assert "- DeepSpeed cannot train SafeKey with reentrant gradient checkpointing" in message
    assert "- `non_finite_loss: skip` is not supported under DeepSpeed" in message
    make_trainer(tmp_path, make_model(), tokenizer, examples, non_finite_loss="stop")  # stopping: fine
