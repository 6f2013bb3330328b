"""`SafeKeySFTTrainer`: TRL's `SFTTrainer` with the Query-Mask Modeling and Dual-Path Safety Head terms added."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, str_to_bool
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .config import SafeKeyConfig, refuse_sequence_sharding
from .data import SAFEKEY_FEATURES, SafeKeyExample, featurize
from .finite import CHECKED, LOSS_TERMS, NonFiniteLossError, describe, loss_flags
from .forward import attach_safekey_forward
from .heads import HEAD_ATTRIBUTE, HEAD_WEIGHTS_NAME, DualPathSafetyHead, save_head_state, split_head_state
from .lm_head import add_tiled_lm_head, supports_tiled_lm_head
from .losses import auxiliary_active, query_masked_loss, safety_head_loss, safety_head_predictions, span_mask
from .model_card import RunFacts, final_terms, render_model_card
from .modeling import apply_tokenizer_settings
from .outputs import disk_full_error, is_disk_full, move_into
from .resume import (
    TRAINER_STATE_NAME,
    check_checkpoint_complete,
    check_checkpoint_matches,
    check_checkpoint_settings,
    latest_complete_checkpoint,
    resolve_resume_from_checkpoint,
    safekey_settings,
    save_safekey_settings,
)
from .run_lock import STAGING_DIR, output_dir_guard
from .tracking import route_safekey_terms

logger = logging.getLogger(__name__)

# Written beside an FSDP checkpoint's optimizer state: the parameters whose state there is a placeholder
OPTIMIZER_PLACEHOLDERS_NAME = "safekey_optimizer_placeholders.json"


def query_masked_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, key_mask: torch.Tensor, rows: torch.Tensor
) -> dict[str, Any]:
    """The query-masked pass's model inputs (`model_inputs`) and the K tokens it predicts (`targets`).

    Only the `rows` given (those with K in range), only up to their last K token, with `attention_mask` (the query
    mask, which hides the query), and only the positions that predict a K token projected through the LM head (a
    boolean `logits_to_keep`): the pass costs what K needs, on every device.
    """
    key_mask = key_mask[rows]
    positions = torch.arange(key_mask.shape[1], device=key_mask.device)
    end = int((positions * key_mask).max()) + 1
    key_mask = key_mask[:, :end]
    input_ids = input_ids[rows, :end]
    # Position p predicts token p + 1: project only the positions just before a K token, row by row
    predicts_key = torch.zeros_like(key_mask, dtype=torch.bool)
    predicts_key[:, :-1] = key_mask[:, 1:].bool()
    return {
        "model_inputs": {
            "input_ids": input_ids,
            "attention_mask": attention_mask[rows, :end],
            "logits_to_keep": predicts_key,
        },
        "targets": input_ids[:, 1:][predicts_key[:, :-1]],
    }


def kept_logits(logits: torch.Tensor, targets: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The query-masked pass's logits in float32, (K tokens, vocab): an error if the model ignored `logits_to_keep`."""
    if logits.shape[:-1] != targets.shape:
        raise RuntimeError(
            f"{type(model).__name__} ignored the boolean `logits_to_keep` mask of the query-masked pass (logits "
            f"{tuple(logits.shape)} for {targets.numel()} K tokens); SafeKey needs a transformers causal LM that "
            "supports it."
        )
    return logits.float()


def _zero_step(optimizer: torch.optim.Optimizer, parameters: set[nn.Parameter]) -> None:
    """Give `parameters` the optimizer state that a step of zero gradients at learning rate 0 makes, changing no
    weight and no other parameter's state (torch.distributed.checkpoint's own way to initialise optimizer state)."""
    grads = {parameter: parameter.grad for group in optimizer.param_groups for parameter in group["params"]}
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
            for parameter in group["params"]:
                parameter.grad = torch.zeros_like(parameter) if parameter in parameters else None
        optimizer.step()
    finally:
        for group, learning_rate in zip(optimizer.param_groups, learning_rates, strict=True):
            group["lr"] = learning_rate
        for parameter, grad in grads.items():
            parameter.grad = grad


class SafeKeyDataCollator(DataCollatorForLanguageModeling):
    """TRL's language-modeling collator, also padding SafeKey's per-token masks and stacking its per-example spans."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        length = output["input_ids"].shape[1]
        for name in ("key_mask", "query_mask"):
            mask = torch.zeros(len(examples), length, dtype=torch.long)
            for row, example in enumerate(examples):
                mask[row, : len(example[name])] = torch.as_tensor(example[name], dtype=torch.long)
            output[name] = mask
        output["understanding_span"] = torch.tensor([example["understanding_span"] for example in examples])
        output["prefix_end"] = torch.tensor([example["prefix_end"] for example in examples])
        output["unsafe"] = torch.tensor([example["unsafe"] for example in examples], dtype=torch.float32)
        return output


class SafeKeySFTTrainer(SFTTrainer):
    """SFT with SafeKey's two auxiliary objectives.

    `compute_loss` = TRL's LM loss (fused LM head; see `lm_head_kernel`) + `qmm_weight`·L_QMM + `head_weight`·(θ·L_U +
    (1−θ)·L_prefix), the auxiliary terms on during the last `auxiliary_epochs` epochs.

    Args:
        model: A model name or path, or a loaded causal LM (PEFT-wrapped models too).
        args: The [`SafeKeyConfig`].
        train_dataset: Featurized rows (from [`featurize`] / [`load_safekey_dataset`]), or a list of
            [`SafeKeyExample`] which is featurized here with `args.max_length`.
        eval_dataset: Same forms as `train_dataset`.
        processing_class: The tokenizer; loaded from `model` when omitted.
        safety_head: A [`DualPathSafetyHead`] to train; a new one sized to the model by default.
        **kwargs: Passed on to [`~trl.SFTTrainer`].
    """

    _tag_names = ["trl", "sft", "safekey"]
    _name = "SafeKey"

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        args: SafeKeyConfig | None = None,
        train_dataset: Dataset | IterableDataset | list[SafeKeyExample] | None = None,
        eval_dataset: Dataset | list[SafeKeyExample] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        safety_head: DualPathSafetyHead | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else SafeKeyConfig(output_dir="safekey-output")
        if not isinstance(args, SafeKeyConfig):
            raise TypeError(f"`args` must be a SafeKeyConfig, got {type(args).__name__}.")
        if processing_class is None:
            from transformers import AutoTokenizer

            name = model if isinstance(model, str) else model.config._name_or_path
            if not name:
                raise ValueError("The model has no name or path to load a tokenizer from: pass `processing_class`.")
            processing_class = AutoTokenizer.from_pretrained(name)
        # `chat_template_path`, `eos_token` and `pad_token` before featurising and building the collator (TRL
        # applies them again in `SFTTrainer.__init__`, which then changes nothing)
        apply_tokenizer_settings(processing_class, args, None if isinstance(model, str) else model)
        train_dataset = self._featurize_if_needed(train_dataset, processing_class, args)
        eval_dataset = self._featurize_if_needed(eval_dataset, processing_class, args)
        if kwargs.get("data_collator") is None:
            pad_token_id = processing_class.pad_token_id
            if pad_token_id is None:
                pad_token_id = processing_class.eos_token_id
            kwargs["data_collator"] = SafeKeyDataCollator(
                pad_token_id=pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
            )
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # An accelerate YAML sets context/sequence parallelism on the accelerator only, not on `args`
        refuse_sequence_sharding(self.accelerator.parallelism_config)
        causal_lm = self._causal_lm()
        if "logits_to_keep" not in inspect.signature(causal_lm.forward).parameters:
            # Found now rather than at the first query-masked pass, epochs into the run
            raise ValueError(
                f"{type(causal_lm).__name__}.forward takes no `logits_to_keep`: SafeKey's query-masked pass projects "
                "only the positions that predict K through the LM head, with a boolean `logits_to_keep` mask. Use a "
                "transformers causal LM that supports it."
            )
        # `SFTTrainer.__init__` gave the model TRL's fused LM head; off Triton devices the tiled kernel serves it
        if args.lm_head_kernel != "trl":
            if args.lm_head_kernel == "tiled" and not supports_tiled_lm_head(causal_lm):
                raise ValueError(
                    f"`lm_head_kernel='tiled'` does not cover {type(causal_lm).__name__}'s LM head (logit scaling, "
                    "soft-capping or MoE router losses): use 'auto' or 'trl'."
                )
            add_tiled_lm_head(causal_lm, always=args.lm_head_kernel == "tiled")
        self._check_distributed_setup()
        if safety_head is None:
            safety_head = DualPathSafetyHead(causal_lm.config.get_text_config().hidden_size)
        if self.is_deepspeed_enabled:
            # DeepSpeed holds every parameter in one dtype (ZeRO-3 flattens them into one buffer, and leaves a model
            # partitioned at load as it is) and keeps their float32 master weights in its optimizer: the head joins
            # the model's dtype, computes in float32 all the same, and its file is written from the master weights
            safety_head = safety_head.to(dtype=next(causal_lm.parameters()).dtype)
        # The head is a submodule of the model, run inside its forward, so that DDP, DeepSpeed and FSDP shard, sync
        # and optimise it like the rest; `_save` writes it to its own file and keeps it out of the exported model.
        self._safekey_outputs: dict[str, Any] = {}
        attach_safekey_forward(causal_lm, safety_head.to(self.args.device), self._safekey_outputs)
        self._head_state_to_save: dict[str, torch.Tensor] | None = None
        self._auxiliary_normalizers: torch.Tensor | None = None
        self._term_sums: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        # Trackers show the SafeKey terms in their own panel (`safekey/qmm_loss`, ...)
        route_safekey_terms(self.callback_handler.callbacks)
        # The training data's names, for the model card (`sft.train` sets them; `create_model_card` adds its own)
        self.dataset_names: list[str] = []
        # Non-finite steps (see `finite.py`): this step's flags and loss on this process, the SafeKey terms of the
        # step held until it is known to count, the finite steps' loss for the log, and the steps skipped
        self._step_flags: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None
        self._pending_terms: dict[str, list[float]] = {}
        self._loss_window = [0.0, 0, 0]  # since the last log: finite steps' loss sum, their count, steps skipped
        self._loss_run = [0.0, 0]
        self.skipped_steps = 0
        # While a checkpoint is written: the folder it is written in, renamed to `checkpoint-N` once whole
        self._checkpoint_staging: str | None = None

    def _check_distributed_setup(self) -> None:
        """Stop, with every reason at once, a run that would not train as asked: an FSDP config that accelerate did
        not set up as FSDP (it runs one as plain data parallel on CPU), FSDP1, reentrant gradient checkpointing
        under DDP or DeepSpeed, or skipping non-finite steps under DeepSpeed."""
        state = self.accelerator.state
        problems = []
        if str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")) and not self.is_fsdp_enabled:
            got = "one process" if state.distributed_type == DistributedType.NO else "plain data parallel (DDP)"
            problems.append(
                f"the accelerate config asks for FSDP, but accelerate set up {state.distributed_type.value}: {got} "
                f"on {self.accelerator.device.type}, every process holding the whole model (accelerate promotes an "
                "FSDP config only on GPUs and other accelerators). Run it there, or use a config that runs here "
                "(ddp, zero2, zero3)."
            )
        if self.is_fsdp_enabled and not self.accelerator.is_fsdp2:
            problems.append(
                "FSDP1 (fsdp_version: 1) is not supported: use FSDP2 (fsdp_version: 2, as in "
                "recipes/accelerate/fsdp.yaml)."
            )
        ddp = state.distributed_type.name.startswith("MULTI_") and self.accelerator.num_processes > 1
        checkpointing = self.args.activation_checkpointing_kwargs or {}
        if (
            (ddp or self.is_deepspeed_enabled)
            and self.args.activation_checkpointing
            and checkpointing.get("use_reentrant", False)
        ):
            problems.append(
                f"{'DeepSpeed' if self.is_deepspeed_enabled else 'DDP'} cannot train SafeKey with reentrant gradient "
                "checkpointing (use_reentrant: true): the query-masked pass runs the layers a second time before "
                "one backward, and reentrant checkpointing then reduces their gradients twice. Set "
                'activation_checkpointing_kwargs (gradient_checkpointing_kwargs) to {"use_reentrant": false}, the '
                "default, or train with FSDP2."
            )
        if self.args.non_finite_loss == "skip" and self.is_deepspeed_enabled:
            problems.append(
                "`non_finite_loss: skip` is not supported under DeepSpeed: its engine steps the optimizer inside the "
                "backward pass, before a step can be checked. Use `non_finite_loss: stop`."
            )
        if problems:
            raise ValueError("This run cannot train as configured:\n- " + "\n- ".join(problems))

    @staticmethod
    def _featurize_if_needed(dataset: Any, tokenizer: PreTrainedTokenizerBase, args: SafeKeyConfig) -> Any:
        if isinstance(dataset, list) and dataset and isinstance(dataset[0], SafeKeyExample):
            dataset, _ = featurize(dataset, tokenizer, args.max_length, num_proc=args.dataset_num_proc)
        if isinstance(dataset, Dataset):
            missing = [name for name in ("input_ids", "labels", *SAFEKEY_FEATURES) if name not in dataset.column_names]
            if missing:
                raise ValueError(
                    f"The dataset lacks the SafeKey feature column(s) {missing}. Build it with "
                    "`safekey_trl.load_safekey_dataset` or `safekey_trl.featurize`."
                )
        return dataset

    # -----------------------------------------------------------------------------------------------------------------
    # Model parts

    def _causal_lm(self) -> PreTrainedModel:
        """The causal LM inside any accelerate or PEFT wrapper."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def safety_head(self) -> DualPathSafetyHead:
        """The Dual-Path Safety Head being trained."""
        return getattr(self._causal_lm(), HEAD_ATTRIBUTE)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *SAFEKEY_FEATURES]))

    # -----------------------------------------------------------------------------------------------------------------
    # Loss

    def _auxiliary_active(self) -> bool:
        num_train_epochs = self.state.num_train_epochs or math.ceil(self.args.num_train_epochs)
        return auxiliary_active(self.state.epoch, num_train_epochs, self.args.auxiliary_epochs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        """Also count, over the whole accumulated batch, K's tokens and the examples with K: the QMM and head terms
        are normalised by these, as the LM term is by its token count, so that gradient accumulation and the number
        of processes leave the loss unchanged."""
        num_items_in_batch = super()._get_num_items_in_batch(batch_samples, device)
        counts = torch.zeros(2, dtype=torch.long)
        for batch in batch_samples:
            if "key_mask" in batch:
                counts[0] += int(batch["key_mask"].sum())
                counts[1] += int(batch["key_mask"].any(dim=1).sum())
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).view(-1, 2).sum(dim=0)
        self._auxiliary_normalizers = counts
        return num_items_in_batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        mode = "train" if self.model.training else "eval"
        safekey = {name: inputs.pop(name) for name in SAFEKEY_FEATURES if name in inputs}
        if len(safekey) != len(SAFEKEY_FEATURES):
            raise ValueError(f"The batch lacks SafeKey features: expected {SAFEKEY_FEATURES}, got {sorted(safekey)}.")
        key_mask = safekey["key_mask"]
        has_key = key_mask.any(dim=1)
        # Every process runs the same passes: ZeRO-3 and FSDP gather each layer's weights as its forward runs, so a
        # pass that one process skips leaves the processes' collectives out of step (an error over gloo, a hang
        # under NCCL). A process whose micro-batch has no K (LM-only rows, K cut by max_length) while another's has
        # runs both passes on a stand-in token, weighted zero.
        active = self._auxiliary_active() and self._any_process_has_key(has_key)
        stand_in = active and not bool(has_key.any())
        # The head and the query-masked pass run inside the model's forward (see `attach_safekey_forward`)
        qmm_inputs = None
        if active and self.args.head_weight > 0:
            inputs["safekey_head_inputs"] = self._head_inputs(safekey, has_key, inputs["input_ids"].shape[1], stand_in)
        if active and self.args.qmm_weight > 0:
            qmm_inputs = self._qmm_inputs(inputs, safekey, has_key, stand_in)
            inputs["safekey_qmm_inputs"] = qmm_inputs["model_inputs"]
        self._safekey_outputs.clear()
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            inputs.pop("safekey_head_inputs", None)
            inputs.pop("safekey_qmm_inputs", None)
        lm_loss = result[0] if return_outputs else result

        # The LM term is normalised by the global token count, scaled up by the number of processes (TRL's
        # `num_items_in_batch` logic). The auxiliary terms follow the same rule with their own counts.
        global_normalization = num_items_in_batch is not None and self._auxiliary_normalizers is not None
        process_scale = 1
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            process_scale = self.accelerator.num_processes // self.get_tp_size()
        zero = torch.zeros((), device=key_mask.device)
        qmm_sum = head_sum = None
        num_key_tokens = num_key_correct = num_head_correct = zero
        loss = lm_loss
        if active:
            key_tokens, key_examples = (
                self._auxiliary_normalizers if global_normalization else (key_mask.sum(), has_key.sum())
            )
            if qmm_inputs is not None:
                qmm_sum, num_key_tokens, num_key_correct = self._query_masked_loss(
                    self._safekey_outputs["qmm_logits"], qmm_inputs["targets"], stand_in
                )
                loss = loss + self.args.qmm_weight * qmm_sum / key_tokens.clamp(min=1) * process_scale
            head_sum, num_head_correct = self._safety_head_loss(
                self._safekey_outputs.get("head_logits"), safekey, has_key, stand_in
            )
            if head_sum is not None:
                loss = loss + self.args.head_weight * head_sum / key_examples.clamp(min=1) * process_scale
        # TRL returns sum / num_items_in_batch · process_scale; log the per-token mean over the micro-batches instead
        local_tokens = (inputs["labels"][:, 1:] != -100).sum()
        if num_items_in_batch is None:
            lm_sum = lm_loss.detach() * local_tokens.clamp(min=1)
        else:
            lm_sum = lm_loss.detach() / process_scale * torch.as_tensor(num_items_in_batch, device=lm_loss.device)
        metrics = torch.stack(
            [
                lm_sum.float(),
                local_tokens.float(),
                qmm_sum.detach().float() if qmm_sum is not None else zero,
                num_key_tokens.float(),
                num_key_correct.float(),
                head_sum.detach().float() if head_sum is not None else zero,
                num_head_correct.float(),
                # The examples the head ran on: none when `head_weight` is 0, or for a stand-in
                has_key.sum().float() if head_sum is not None else zero,
            ]
        )
        # One collective a micro-batch, with every process's row: `gather_for_metrics` would drop rows at the end of
        # a dataloader, taking them for samples repeated to even out the last batch (those did train, and count)
        lm_total, token_total, qmm_total, key_total, key_correct, head_total, head_correct, examples = (
            self.accelerator.gather(metrics.unsqueeze(0)).view(-1, len(metrics)).sum(dim=0).tolist()
        )
        self._accumulate_term(mode, "lm_loss", lm_total, token_total)
        self._accumulate_term(mode, "qmm_loss", qmm_total, key_total)
        self._accumulate_term(mode, "qmm_key_accuracy", key_correct, key_total)
        self._accumulate_term(mode, "head_loss", head_total, examples)
        self._accumulate_term(mode, "head_accuracy", head_correct, examples)
        if mode == "train":
            self._note_step(lm_loss, qmm_sum, head_sum, loss)
        if not active:
            return result
        return (loss, result[1]) if return_outputs else loss

    def _any_process_has_key(self, has_key: torch.Tensor) -> bool:
        """Whether the micro-batch of any process holds an example with K (one small collective when distributed)."""
        local = bool(has_key.any())
        if self.accelerator.num_processes == 1:
            return local
        return bool(self.accelerator.gather(torch.tensor([local], device=has_key.device)).any())

    def _accumulate_term(self, mode: str, name: str, total: float, count: float) -> None:
        # Sums and counts over the logging window, so that a logged term is its mean over every token or example
        # of the window, whatever the micro-batching (TRL's own metrics average the micro-batch means)
        # Training terms wait in `_pending_terms` until their optimizer step is known to be finite (`_check_step`)
        if count > 0:
            sums = (self._pending_terms if mode == "train" else self._term_sums[mode]).setdefault(name, [0.0, 0.0])
            sums[0] += total
            sums[1] += count

    def _commit_pending_terms(self) -> None:
        for name, (total, count) in self._pending_terms.items():
            sums = self._term_sums["train"].setdefault(name, [0.0, 0.0])
            sums[0] += total
            sums[1] += count
        self._pending_terms.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        if mode == "train":
            self._commit_pending_terms()  # terms of a `compute_loss` called outside the training loop
        for name, (total, count) in self._term_sums[mode].items():
            logs[f"{prefix}{name}"] = total / count
        self._term_sums[mode].clear()
        if mode == "train" and "loss" in logs:
            # The Trainer replaces a non-finite step's loss by a running mean, which is 0 when a logging window
            # starts with it: log the mean of the steps taken instead (NaN when every step was skipped), never 0
            total, steps, skipped = self._loss_window
            if skipped:
                logs["loss"] = total / steps if steps else float("nan")
            self._loss_window = [0.0, 0, 0]
        if self.skipped_steps and ("loss" in logs or "train_loss" in logs):
            logs["skipped_steps"] = self.skipped_steps
            if "train_loss" in logs:
                logs["train_loss"] = self._loss_run[0] / self._loss_run[1] if self._loss_run[1] else float("nan")
        super().log(logs, start_time)

    # -----------------------------------------------------------------------------------------------------------------
    # Non-finite steps

    def _note_step(self, lm_loss, qmm_sum, head_sum, loss) -> None:
        # Device-side flags, no synchronisation: the step's decision gathers them once (`_check_step`)
        flags = loss_flags(lm_loss, qmm_sum, head_sum, loss)
        self._step_flags = flags if self._step_flags is None else torch.maximum(self._step_flags, flags)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # Called on every process right before the optimizer step, with the norm TRL clipped with: the step is
        # checked here, while it can still be stopped or skipped
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._check_step(grad_norm)
        return grad_norm

    def _check_step(self, grad_norm: Any) -> None:
        """Stop or skip an optimizer step whose loss terms or gradient norm are not finite on any process."""
        device = self.args.device
        flags = self._step_flags if self._step_flags is not None else torch.zeros(len(LOSS_TERMS), device=device)
        grad_bad = torch.zeros(1, device=device)
        # Under fp16 the gradient scaler expects infinite gradients now and then and skips those steps itself
        if grad_norm is not None and self.accelerator.scaler is None:
            if isinstance(grad_norm, DTensor):  # FSDP2's norm of its sharded gradients (replicated)
                grad_norm = grad_norm.full_tensor()
            norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=device).reshape(1)
            grad_bad = (~torch.isfinite(norm)).float()
        step_loss = self._step_loss if self._step_loss is not None else torch.zeros((), device=device)
        local = torch.cat([flags.float().to(device), grad_bad, step_loss.float().reshape(1).to(device)])
        self._step_flags = self._step_loss = None
        # One gather: every process sees every process's flags, so all take the same decision
        gathered = self.accelerator.gather(local.unsqueeze(0)) if self.accelerator.num_processes > 1 else local
        rows = gathered.view(-1, len(CHECKED) + 1).tolist()
        bad = [name for index, name in enumerate(CHECKED) if any(row[index] > 0 for row in rows)]
        step_loss_mean = sum(row[-1] for row in rows) / len(rows)
        if not bad:
            self._commit_pending_terms()
            self._loss_window[0] += step_loss_mean
            self._loss_window[1] += 1
            self._loss_run[0] += step_loss_mean
            self._loss_run[1] += 1
            return
        self._pending_terms.clear()
        step = self.state.global_step + 1
        if self.args.non_finite_loss == "skip":
            self.optimizer.zero_grad(set_to_none=True)  # the optimizer step then leaves every weight as it was
            self.skipped_steps += 1
            self._loss_window[2] += 1
            logger.warning(
                "step %d: %s not finite; the step is skipped (weights unchanged), %d skipped so far.",
                step,
                describe(bad),
                self.skipped_steps,
            )
            return
        last = latest_complete_checkpoint(self.args.output_dir)
        raise NonFiniteLossError(
            step,
            bad,
            f"training stopped at step {step}: {describe(bad)} {'is' if len(bad) == 1 else 'are'} not finite (NaN "
            f"or infinite). The step was not applied: the weights are those after step {step - 1}; "
            + (f"the last checkpoint is {last}" if last else "no checkpoint was saved yet")
            + f". Lower the learning rate (now {self.args.learning_rate:g}) or check the data; "
            "`--non_finite_loss skip` skips such steps instead.",
        )

    def _qmm_inputs(
        self,
        inputs: dict[str, torch.Tensor],
        safekey: dict[str, torch.Tensor],
        has_key: torch.Tensor,
        stand_in: bool = False,
    ) -> dict[str, Any]:
        """The query-masked pass's inputs for this micro-batch (see [`query_masked_inputs`]); with `stand_in` (no K
        here, some on another process): the first row's first two tokens, predicting the second, with the plain
        attention mask (the query mask could hide every token of it)."""
        if stand_in:
            rows = torch.zeros_like(has_key)
            rows[0] = True
            key_mask = torch.zeros_like(safekey["key_mask"])
            key_mask[0, 1] = 1
            return query_masked_inputs(inputs["input_ids"], inputs["attention_mask"], key_mask, rows)
        attention = safekey["query_mask"] if self.args.qmm_mask_query else inputs["attention_mask"]
        return query_masked_inputs(inputs["input_ids"], attention, safekey["key_mask"], has_key)

    def _query_masked_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, stand_in: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_QMM summed over K's tokens, their number and how many were predicted top-1; zero-weighted for a
        `stand_in`."""
        loss, correct = query_masked_loss(kept_logits(logits, targets, self._causal_lm()), targets)
        zero = torch.zeros((), dtype=torch.long, device=targets.device)
        if stand_in:
            return loss * 0, zero, zero
        return loss, torch.as_tensor(targets.numel(), device=targets.device), correct

    def _query_masked_pass(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        safekey: dict[str, torch.Tensor],
        has_key: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The query-masked pass alone, as its own call of `model` (`compute_loss` runs it inside the main pass's
        call): the summed L_QMM over K's tokens (None when no example has K), their count and the top-1 hits."""
        zero = torch.zeros((), dtype=torch.long, device=has_key.device)
        if not bool(has_key.any()):
            return None, zero, zero
        attention = safekey["query_mask"] if self.args.qmm_mask_query else inputs["attention_mask"]
        qmm = query_masked_inputs(inputs["input_ids"], attention, safekey["key_mask"], has_key)
        outputs = model(**qmm["model_inputs"], fused_lm_head=False, use_cache=False)
        loss, correct = query_masked_loss(
            kept_logits(outputs.logits, qmm["targets"], self._causal_lm()), qmm["targets"]
        )
        return loss, torch.as_tensor(qmm["targets"].numel(), device=has_key.device), correct

    def _head_inputs(
        self, safekey: dict[str, torch.Tensor], has_key: torch.Tensor, length: int, stand_in: bool = False
    ) -> dict[str, Any]:
        """What the model's forward needs to run the head: the rows with K, and the U and prefix masks to pool
        (with `stand_in`: the first row, pooled over its first token)."""
        if stand_in:
            rows = torch.zeros_like(has_key)
            rows[0] = True
            understanding = prefix = torch.tensor([[0, 1]], device=has_key.device)
        else:
            rows = has_key
            understanding = safekey["understanding_span"][has_key]
            prefix = F.pad(safekey["prefix_end"][has_key].unsqueeze(1), (1, 0))  # [0, prefix_end)
        return {
            "rows": rows,
            "understanding_mask": span_mask(understanding[:, 0], understanding[:, 1], length),
            "prefix_mask": span_mask(prefix[:, 0], prefix[:, 1], length),
            "detach": self.args.head_detach_hidden,
        }

    def _safety_head_loss(
        self,
        logits: tuple[torch.Tensor, torch.Tensor] | None,
        safekey: dict[str, torch.Tensor],
        has_key: torch.Tensor,
        stand_in: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The head's summed per-example loss over the rows with K (None when the head did not run) and how many
        of them it got right; zero-weighted for a `stand_in` row."""
        no_examples = torch.zeros((), dtype=torch.long, device=has_key.device)
        if logits is None:
            return None, no_examples
        understanding_logits, prefix_logits = logits
        if stand_in:
            return (understanding_logits + prefix_logits).sum() * 0, no_examples
        unsafe = safekey["unsafe"][has_key]
        theta = self.args.head_theta
        loss = safety_head_loss(understanding_logits, prefix_logits, unsafe, theta).sum()
        correct = (safety_head_predictions(understanding_logits, prefix_logits, theta) == unsafe.bool()).sum()
        return loss, correct

    # -----------------------------------------------------------------------------------------------------------------
    # Saving and resuming

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """Train; `resume_from_checkpoint` is a checkpoint path, or `True`/`"true"`/`"auto"` for the last complete
        checkpoint in `output_dir` (none yet: start fresh). A checkpoint written with other SafeKey settings, for
        another model, or as a LoRA adapter for a full fine-tune (or the other way round) is refused before any weight
        loads. `output_dir` is locked for the run (see `run_lock`): a live run there, or a finished one not resumed,
        is refused."""
        checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_checkpoint_complete(checkpoint)
            check_checkpoint_settings(checkpoint, self.args)
            check_checkpoint_matches(checkpoint, self._causal_lm(), self._adapter_config())
        self._warn_accumulation_beyond_epoch()
        with output_dir_guard(self.args.output_dir, checkpoint is not None, self.args.overwrite_output_dir):
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def _adapter_config(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        configs = getattr(model, "peft_config", None)
        return next(iter(configs.values())) if configs else None

    def _accumulation(self) -> tuple[int, int, int | None]:
        """`(batches accumulated per optimizer step, examples per step, batches per epoch on a process)`, as run: an
        epoch with fewer batches than `gradient_accumulation_steps` makes each step accumulate the whole epoch."""
        asked = self.args.gradient_accumulation_steps
        per_step = self.args.per_device_train_batch_size * self.args.world_size
        try:
            examples = len(self.train_dataset)
        except TypeError:  # an iterable dataset: no epoch length to compare with
            return asked, asked * per_step, None
        batches = examples // per_step if self.args.dataloader_drop_last else math.ceil(examples / per_step)
        if batches == 0 or asked <= batches:
            return asked, asked * per_step, batches
        return batches, min(batches * per_step, examples), batches

    def _warn_accumulation_beyond_epoch(self) -> None:
        accumulated, examples, batches = self._accumulation()
        asked = self.args.gradient_accumulation_steps
        if accumulated < asked:
            logger.warning(
                "gradient_accumulation_steps=%d is more than the %d batch(es) of an epoch "
                "(per_device_train_batch_size %d x %d process(es)): each optimizer step accumulates the whole epoch, "
                "%d examples, not %d. The model card and safekey_config.json record what is run.",
                asked,
                batches,
                self.args.per_device_train_batch_size,
                self.args.world_size,
                examples,
                asked * self.args.per_device_train_batch_size * self.args.world_size,
            )

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is saved, the Trainer writes it into the staging folder (see `_save_checkpoint`)
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written aside in `output_dir/_safekey_incomplete/checkpoint-N` and renamed to
        `checkpoint-N` once every process has written its part: an interrupted or failed save never leaves a
        `checkpoint-N` that auto-resume would take for complete. A full disk is reported as one line."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = run_dir / STAGING_DIR / name, run_dir / name

        def kept(last: str | None) -> str:
            checkpoint = f"the last complete checkpoint {last}" if last else "no complete checkpoint yet"
            return f"kept: {checkpoint}; the incomplete one was removed"

        self._checkpoint_staging = str(staged.parent)
        try:
            with self._writing_aside(staged, run_dir, kept):
                super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        if self.state.best_model_checkpoint == str(staged):
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            # With `save_on_each_node` on a shared filesystem another node's process may have moved it already
            if staged.exists():
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staged, final)
            with contextlib.suppress(OSError):  # not empty, or already gone
                staged.parent.rmdir()
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def save_run(self, output_dir: str | None = None, model_name: str | None = None) -> None:
        """Save the final model (or adapter), its head, the SafeKey settings and the model card into `output_dir`:
        written aside, then moved in file by file, so that a full disk or an interruption leaves no truncated file
        and the checkpoints untouched. A full disk is reported as one line. It does not push: `push_to_hub` saves and
        uploads `output_dir` itself (`sft.train` calls it after)."""
        target = Path(output_dir or self.args.output_dir)
        staged = target / STAGING_DIR / "final"

        def kept(last: str | None) -> str:
            return f"kept: {'the checkpoints, the last ' + last if last else 'no checkpoint'}; no partial file"

        with self._writing_aside(staged, target, kept):
            # An internal call: under `push_to_hub` the Trainer's `save_model` would push from inside this save,
            # saving the model once more straight into output_dir, before the staged files are moved in
            self.save_model(str(staged), _internal_call=True)
            if self.is_world_process_zero():
                self._write_model_card(staged, model_name or target.name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save and staged.exists():
            move_into(staged, target)
            with contextlib.suppress(OSError):
                staged.parent.rmdir()
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _writing_aside(self, staged: Path, run_dir: Path, kept: Callable[[str | None], str]) -> Iterator[None]:
        """Around a save into the staging folder `staged` (emptied first, every process in step): a failed save
        leaves no partial folder, and a full disk is one line saying what was kept, `kept(the last complete
        checkpoint in run_dir)`."""
        if self.args.should_save and staged.exists():
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        try:
            yield
        except Exception as error:
            full = is_disk_full(error, staged)
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            if not full:
                raise
            raise disk_full_error(staged, kept(latest_complete_checkpoint(run_dir))) from None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the clean model and, beside it, the head in float32 and the SafeKey settings.

        The head's float32 weights are gathered on every process first (a collective under ZeRO and FSDP). FSDP's
        sharded checkpoints hold the model, head included, in their shards (what resuming reads); the head file and
        the settings are written beside them all the same, for export and for the settings check on resume.
        """
        self._head_state_to_save = self._float32_head_state()
        try:
            super().save_model(output_dir, _internal_call)
            if self._head_state_to_save is not None:  # no `_save`: FSDP's sharded state dict
                self._save_head(output_dir if output_dir is not None else self.args.output_dir, {})
        finally:
            self._head_state_to_save = None

    def _float32_head_state(self) -> dict[str, torch.Tensor]:
        """The head's weights in float32, whole: DeepSpeed's float32 master weights, FSDP's gathered shards."""
        state = {}
        for name, parameter in self.safety_head.named_parameters():
            value = None
            if self.is_deepspeed_enabled:
                from deepspeed.utils import safe_get_full_fp32_param

                value = safe_get_full_fp32_param(parameter)  # None before the optimizer exists
            if value is None and isinstance(parameter, DTensor):
                value = parameter.full_tensor()
            if value is None:
                value = parameter.detach()
            state[name] = value.detach().float().cpu()
        return state

    def _save_head(self, output_dir: str, head_state: dict[str, torch.Tensor]) -> None:
        if self.args.should_save and (head_state or self._head_state_to_save):
            head_state = self._head_state_to_save or {name: value.float() for name, value in head_state.items()}
            save_head_state(head_state, output_dir)
            save_safekey_settings(self.args, output_dir, run=self.run_facts().to_dict())
        self._head_state_to_save = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save a clean causal LM (no head weights) and the head beside it in `safekey_head.safetensors`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        head_state, model_state = split_head_state(state_dict)
        self._save_head(output_dir, head_state)
        super()._save(output_dir, state_dict=model_state)

    def run_facts(self) -> RunFacts:
        """What the model card states: settings, base model, data and its label balance, final per-term losses."""
        accumulation = self._accumulation()
        model = self.accelerator.unwrap_model(self.model)
        adapter = hasattr(model, "peft_config")
        if adapter:
            base_model = next(iter(model.peft_config.values())).base_model_name_or_path
        else:
            base_model = self._causal_lm().config._name_or_path
        facts = RunFacts(
            settings=safekey_settings(self.args),
            # A local directory names nothing a reader could load
            base_model=base_model if base_model and not Path(base_model).is_dir() else None,
            adapter=adapter,
            datasets=list(self.dataset_names),
            training={
                "num_train_epochs": self.args.num_train_epochs,
                "learning_rate": self.args.learning_rate,
                "effective_batch_size": accumulation[1],
                "gradient_accumulation_steps": accumulation[0],
                "max_length": self.args.max_length,
            },
            final=final_terms(self.state.log_history),
        )
        if accumulation[0] < self.args.gradient_accumulation_steps:
            # What the recipe asked for, beside what was run
            facts.training["gradient_accumulation_steps_asked"] = self.args.gradient_accumulation_steps
        if self.skipped_steps:
            facts.training["skipped_steps"] = self.skipped_steps
        quantization = getattr(self._causal_lm().config, "quantization_config", None)
        if quantization is not None:
            facts.base_quantization = (
                quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
            )
        if isinstance(self.train_dataset, Dataset):
            has_key = [end > 0 for end in self.train_dataset["prefix_end"]]
            unsafe = self.train_dataset["unsafe"]
            facts.examples = len(has_key)
            facts.harmful = sum(key and bool(label) for key, label in zip(has_key, unsafe, strict=True))
            facts.benign = sum(has_key) - facts.harmful
            facts.lm_only = facts.examples - sum(has_key)
        return facts

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Write SafeKey's own model card to `output_dir/README.md` (what `push_to_hub` uploads): the SafeKey
        settings, the data and its harmful/benign balance, the final per-term losses, the head file, how to load."""
        if not self.is_world_process_zero():
            return
        if dataset_name and dataset_name not in self.dataset_names:
            self.dataset_names.append(dataset_name)
        self._write_model_card(Path(self.args.output_dir), model_name, tags)

    def _write_model_card(self, directory: Path, model_name: str | None, tags: str | list[str] | None = None) -> None:
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = render_model_card(self.run_facts(), repo_id=self.hub_model_id or model_name, tags=tags)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "README.md").write_text(card, encoding="utf-8")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # FSDP2's loader (torch.distributed.checkpoint) wants optimizer state for every trainable parameter, and the
        # head has none before its first auxiliary step: a checkpoint of the plain-SFT epochs holds a placeholder
        # for it (what that loader makes itself: a step of zero gradients at learning rate 0), dropped again after
        # the save and after a load, so that the head's state starts at its first real step either way.
        placeholders = self._parameters_without_optimizer_state() if self.is_fsdp_enabled else {}
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if placeholders:
            _zero_step(optimizer, set(placeholders.values()))
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            for parameter in placeholders.values():
                optimizer.state.pop(parameter, None)
        if placeholders and self.args.should_save:
            content = json.dumps({"parameters": sorted(placeholders)}, indent=2) + "\n"
            (Path(output_dir) / OPTIMIZER_PLACEHOLDERS_NAME).write_text(content, encoding="utf-8")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        marker = Path(checkpoint) / OPTIMIZER_PLACEHOLDERS_NAME if checkpoint is not None else None
        if marker is not None and marker.is_file():
            names = set(json.loads(marker.read_text(encoding="utf-8"))["parameters"])
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            for name, parameter in self.model.named_parameters():
                if name in names:
                    optimizer.state.pop(parameter, None)

    def _parameters_without_optimizer_state(self) -> dict[str, nn.Parameter]:
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return {
            name: parameter
            for name, parameter in self.model.named_parameters()
            if parameter.requires_grad and id(parameter) in in_optimizer and parameter not in optimizer.state
        }

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        head_file = Path(resume_from_checkpoint) / HEAD_WEIGHTS_NAME
        if not head_file.is_file():
            raise FileNotFoundError(
                f"{resume_from_checkpoint}: no {HEAD_WEIGHTS_NAME}; "
                "this checkpoint was not written by SafeKeySFTTrainer."
            )
        if self.is_fsdp_enabled:
            return  # FSDP's own model files (sharded or full) hold the head, and have restored it with the rest
        # Read on the CPU (a device such as "cpu:0" is no safetensors device); `load_state_dict` copies it in place
        self.safety_head.load_state_dict(load_file(str(head_file)))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # The head is not in the model's weights file (it has its own), so it is never a missing key; nor is a weight
        # tied to one that loaded (the LM head tied to the embeddings is saved once, under the embeddings' name)
        tied = self._tied_to_loaded(load_result.missing_keys)
        missing = [key for key in load_result.missing_keys if f"{HEAD_ATTRIBUTE}." not in key and key not in tied]
        load_result.missing_keys.clear()
        load_result.missing_keys.extend(missing)
        super()._issue_warnings_after_load(load_result)

    def _tied_to_loaded(self, missing_keys: list[str]) -> set[str]:
        """The missing keys whose parameter is the same tensor as a parameter that loaded."""
        missing = set(missing_keys)
        by_storage: dict[int, list[str]] = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            by_storage.setdefault(parameter.data_ptr(), []).append(name)
        return {
            name
            for names in by_storage.values()
            if any(other not in missing for other in names)
            for name in names
            if name in missing
        }
