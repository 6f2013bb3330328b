"""`SafeKeyConfig`: TRL's `SFTConfig` plus the SafeKey objective's fields, and the script arguments of a recipe."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from accelerate.parallelism_config import ParallelismConfig
from trl import DatasetMixtureConfig, SFTConfig
from trl.scripts.utils import DatasetConfig

from .data.chat_formats.families import FORMAT_NAMES


@dataclass
class SafeKeyConfig(SFTConfig):
    r"""
    Configuration class for [`SafeKeySFTTrainer`]: every [`~trl.SFTConfig`] field, plus those of the SafeKey
    objective. The defaults are the paper's.

    The loss is `L = L_LM + qmm_weight · L_QMM + head_weight · (head_theta · L_U + (1 − head_theta) · L_prefix)`,
    with the two auxiliary terms on during the last `auxiliary_epochs` epochs only.

    Parameters:
        qmm_weight (`float`, *optional*, defaults to `0.2`):
            Weight of the Query-Mask Modeling loss: the LM loss on the key sentence K's tokens, in a second forward
            pass where the user's query is hidden from attention.
        head_weight (`float`, *optional*, defaults to `0.2`):
            Weight of the Dual-Path Safety Head's binary cross-entropy.
        head_theta (`float`, *optional*, defaults to `0.5`):
            Mix θ of the head's two paths: θ on the path pooled over the understanding U, 1 − θ on the path pooled
            over everything before K.
        auxiliary_epochs (`int`, *optional*, defaults to `2`):
            How many final epochs carry the two auxiliary terms. Earlier epochs train plain SFT.
        qmm_mask_query (`bool`, *optional*, defaults to `True`):
            Hide the query in the second pass. `False` is the paper's ablation "QMM without the query mask": the
            second pass then sees the whole prompt, which only up-weights K's tokens.
        head_detach_hidden (`bool`, *optional*, defaults to `False`):
            The paper's ablation that trains the head on detached hidden states: the head still learns, but its loss
            sends no gradient into the model. `L_LM` and `L_QMM` are unchanged.
        lm_head_kernel (`str`, *optional*, defaults to `"auto"`):
            How the LM term's head is computed without building the full logits. `"trl"`: TRL's fused LM head, whose
            Triton kernel runs on CUDA and XPU and whose torch fallback runs elsewhere. `"tiled"`: SafeKey's tiled
            torch kernel (`safekey_trl.lm_head`), several times faster than TRL's fallback on a CPU. `"auto"`: TRL's
            on devices with Triton, the tiled kernel elsewhere. Both give the same loss, gradients and metrics.
            Models whose LM head TRL transforms (logit scaling, soft-capping) and MoE models use TRL's under `"auto"`;
            `"tiled"` refuses them.
        non_finite_loss (`str`, *optional*, defaults to `"stop"`):
            What a training step whose loss (the total, or any SafeKey term) or gradient norm is NaN or infinite does,
            decided before the optimizer step and alike on every process. `"stop"`: training stops with an error
            naming the step and the terms, before the weights change, so every checkpoint saved holds finite weights.
            `"skip"`: the step leaves the weights and optimizer state as they were (it still counts in the schedule),
            and is counted in the logged `skipped_steps`; the logged losses average the steps that were taken. Under
            fp16 the gradient scaler already skips steps with infinite gradients, so only the losses are checked;
            `"skip"` is refused under DeepSpeed, whose engine steps inside the backward pass.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Start a new run in an `output_dir` that holds another run's model or checkpoints (its `checkpoint-*`
            folders are removed first). Without it such a folder is refused unless the run resumes from it.
    """

    qmm_weight: float = field(
        default=0.2, metadata={"help": "Weight of the Query-Mask Modeling loss on the key sentence K."}
    )
    head_weight: float = field(default=0.2, metadata={"help": "Weight of the Dual-Path Safety Head loss."})
    head_theta: float = field(default=0.5, metadata={"help": "Mix θ of the head paths: θ·L_U + (1−θ)·L_prefix."})
    auxiliary_epochs: int = field(
        default=2, metadata={"help": "Number of final epochs that carry the QMM and head terms."}
    )
    qmm_mask_query: bool = field(
        default=True, metadata={"help": "Hide the query in the QMM pass (False: the paper's no-mask ablation)."}
    )
    head_detach_hidden: bool = field(
        default=False,
        metadata={
            "help": "Train the head on detached hidden states (the paper's ablation): no gradient to the model."
        },
    )
    lm_head_kernel: str = field(
        default="auto",
        metadata={
            "help": "LM-term kernel: 'trl' (TRL's fused LM head), 'tiled' (SafeKey's torch kernel, fast on CPU), "
            "or 'auto' (TRL's where Triton runs, tiled elsewhere).",
            "choices": ["auto", "trl", "tiled"],
        },
    )
    non_finite_loss: str = field(
        default="stop",
        metadata={
            "help": "A step with a NaN or infinite loss or gradient norm: 'stop' training (naming the step) or "
            "'skip' it (the weights unchanged, counted in `skipped_steps`).",
            "choices": ["stop", "skip"],
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds another run's model or checkpoints (removing its "
            "checkpoints); without it such a folder is refused unless resuming."
        },
    )

    # TRL turns checkpointing on by default through `gradient_checkpointing`, which transformers 5 deprecates for
    # `activation_checkpointing` with a FutureWarning whenever it is set: left unset here, TRL's default goes to the
    # new name, so a recipe that never mentions either gets no warning (one that sets the old name still does)
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated by transformers 5: use `activation_checkpointing` (on unless set false)."},
    )

    def __post_init__(self):
        if self.gradient_checkpointing is None and self.activation_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        # The head has no gradient in the plain-SFT epochs, or in a micro-batch whose K were all cut: DDP must look for
        # unused parameters (transformers turns that off under gradient checkpointing, which would fail there)
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        super().__post_init__()
        for name in ("qmm_weight", "head_weight"):
            # `nan < 0` is False: test finiteness first, or a nan weight would pass and turn every loss into nan
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {getattr(self, name)}.")
        if not 0.0 <= self.head_theta <= 1.0:
            raise ValueError(f"`head_theta` must be in [0, 1], got {self.head_theta}.")
        if self.lm_head_kernel not in ("auto", "trl", "tiled"):
            raise ValueError(f"`lm_head_kernel` must be 'auto', 'trl' or 'tiled', got {self.lm_head_kernel!r}.")
        if self.non_finite_loss not in ("stop", "skip"):
            raise ValueError(f"`non_finite_loss` must be 'stop' or 'skip', got {self.non_finite_loss!r}.")
        self._refuse_counts_that_cannot_run()
        if self.auxiliary_epochs < 0:
            raise ValueError(f"`auxiliary_epochs` must be >= 0, got {self.auxiliary_epochs}.")
        # (with `max_steps` set, the Trainer ignores `num_train_epochs`, and so does this check)
        if self.max_steps <= 0 and self.auxiliary_epochs > self.num_train_epochs:
            raise ValueError(
                f"`auxiliary_epochs` ({self.auxiliary_epochs}) is more than `num_train_epochs` "
                f"({self.num_train_epochs}): the auxiliary terms run during the last `auxiliary_epochs` epochs."
            )
        self._refuse_what_safekey_cannot_train_with()
        if self.truncation_mode != "keep_start":
            raise ValueError(
                "SafeKey truncates on the right (`truncation_mode='keep_start'`), so that U and K survive."
            )

    def _refuse_counts_that_cannot_run(self) -> None:
        """Stop at start-up on a step count, interval or length that would train something other than asked (the
        Trainer reads `max_steps: 0` as "one step" and `save_steps: 0` as "never"), naming the option."""
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"`max_steps` must be a positive number of steps, or -1 to train for `num_train_epochs`; got "
                f"{self.max_steps}."
            )
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"`num_train_epochs` must be > 0, got {self.num_train_epochs}.")
        for name, strategy in (("save_steps", self.save_strategy), ("eval_steps", self.eval_strategy)):
            value = getattr(self, name)
            if strategy == "steps" and value is not None and not value > 0:
                raise ValueError(
                    f"`{name}` must be > 0 with `{name[:4]}_strategy: steps` (a number of steps, or a fraction of the "
                    f"run below 1); got {value}. To turn it off, set `{name[:4]}_strategy: no`."
                )
        for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens (or unset: no truncation), got {self.max_length}."
            )
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise ValueError(f"`learning_rate` must be a finite number >= 0, got {self.learning_rate}.")

    def _refuse_what_safekey_cannot_train_with(self) -> None:
        """Stop at start-up on an `SFTConfig` switch that would drop, shift or duplicate SafeKey's spans and masks."""
        if self.packing or self.padding_free:
            raise ValueError(
                "SafeKey does not support `packing` or `padding_free` yet: its K and U spans, query mask and the "
                "query-masked pass are laid out per row of a padded batch, and a flattened row would mix examples. "
                "Set `packing=False` and `padding_free=False` (lower `per_device_train_batch_size` and raise "
                "`gradient_accumulation_steps` to save the padding's memory)."
            )
        if self.use_liger_kernel:
            raise ValueError(
                "SafeKey does not support `use_liger_kernel`: Liger's kernels patch the model's forward, which "
                "SafeKey's query-masked pass and safety head run through and which has not been checked with them "
                "(TRL 1.16 deprecates the flag). Set `use_liger_kernel=False`."
            )
        if self.assistant_only_loss:
            raise ValueError(
                "`assistant_only_loss` does not apply to SafeKey: its rows are tokenized by SafeKey, whose labels "
                "already cover the assistant's response only (the prompt is -100). Set `assistant_only_loss=False`."
            )
        if self.completion_only_loss is False:
            raise ValueError(
                "SafeKey always trains on the response only (its labels mask the prompt), so "
                "`completion_only_loss=False` cannot be honoured: leave it unset (or True)."
            )
        refuse_sequence_sharding(self.parallelism_config)


def refuse_sequence_sharding(parallelism_config: ParallelismConfig | None) -> None:
    """Stop on context or sequence parallelism: either splits each row's sequence across processes, while SafeKey's
    query mask needs the per-layer attention mask (context parallelism drops it for plain causal attention) and its
    spans index the whole row. Called on the config's and on the accelerator's parallelism config (an accelerate YAML
    sets only the latter)."""
    if parallelism_config is None:
        return
    if parallelism_config.cp_enabled:
        raise ValueError(
            f"SafeKey does not support context parallelism (cp_size={parallelism_config.cp_size}): it drops the "
            "per-layer attention mask and would silently train the query-masked pass with the query visible. Set "
            "`cp_size` to 1."
        )
    if parallelism_config.sp_enabled:
        raise ValueError(
            f"SafeKey does not support sequence parallelism (sp_size={parallelism_config.sp_size}): it splits each "
            "row across processes, while SafeKey's K and U spans and its query-masked pass index the whole row. Set "
            "`sp_size` to 1."
        )


@dataclass
class SafeKeyDatasetConfig(DatasetConfig):
    """One dataset of a mixture: TRL's [`~trl.scripts.utils.DatasetConfig`] (`path`, `name`, `data_dir`,
    `data_files`, `split`, `columns`, `fraction`) plus `column_map`.

    Parameters:
        column_map (`dict[str, str]`, *optional*):
            Rename columns, `{old: new}`, after `columns` has selected them: e.g. `{conversations: messages}`.
    """

    column_map: dict[str, str] | None = None


@dataclass
class SafeKeyScriptArguments(DatasetMixtureConfig):
    """Where a recipe's data comes from: one `dataset_name`, or a mixture in TRL's form (`datasets`).

    Parameters:
        dataset_name (`str`, *optional*):
            A `.jsonl`, `.json` or `.parquet` file in the SafeKey format, or a Hub dataset name. Ignored when
            `datasets` is set. A recipe names one or the other (as in TRL): there is no default dataset (the tiny
            recipes name the sample).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on, for a Hub dataset.
        eval_dataset_name (`str`, *optional*):
            A second dataset, in the same format, to evaluate on.
        skip_invalid (`bool`, *optional*, defaults to `False`):
            Leave out invalid rows, with a counted report, instead of stopping at the first.
        dequantize_mxfp4 (`bool`, *optional*, defaults to `False`):
            Load a checkpoint stored in MXFP4 (gpt-oss) dequantized to `dtype`: its MXFP4 kernels do not train.
        chat_format (`str`, *optional*, defaults to `"auto"`):
            The model family whose format the examples are rendered in (`safekey_trl.data.chat_formats`): `auto` picks
            it by what the tokenizer's chat template renders, a family name (`r1_distill`, `qwen3`, `gpt_oss`,
            `nemotron_3`, `glm4_moe`, `deepseek_v3`, `gemma4`, `phi4_reasoning`, `olmo3_think`) takes the template to
            be of that family, and `verbatim` appends the SafeKey response to the rendered prompt as it is.
        chat_format_turn (`str`, *optional*):
            For a model the family table does not know: its assistant turn as the model writes it after the
            template's own generation prompt, with `{trace}` and `{answer}` placeholders, e.g.
            `"<think>{trace}</think>{answer}<|im_end|>"`. It must end with a special token (the model must learn to
            stop); the template still renders the prompt.
        chat_template_kwargs (`dict`, *optional*):
            Variables passed to the chat template when rendering the examples (`{"reasoning_effort": "high"}` for
            gpt-oss, ...), over the family's own (`enable_thinking: true`).
        datasets (`list[SafeKeyDatasetConfig]`, *optional*):
            A mixture, as TRL's `DatasetMixtureConfig`: each entry a [`SafeKeyDatasetConfig`], `fraction`s set on
            all or none (target shares, normalised, no dataset oversampled). Rows without U and K (plain SFT data)
            train the LM term only.
        test_split_size (`float`, *optional*):
            Hold out this share (or number) of the mixture as the evaluation set.
    """

    datasets: list[SafeKeyDatasetConfig] = field(
        default_factory=list,
        metadata={"help": "A data mixture in TRL's form (recipe only): a list of {path, split, fraction, ...}."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "SafeKey-format file or Hub dataset name (or a `datasets` mixture)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (Hub datasets)."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Optional evaluation dataset."})
    skip_invalid: bool = field(
        default=False, metadata={"help": "Skip invalid rows with a counted report instead of failing."}
    )
    dequantize_mxfp4: bool = field(
        default=False,
        metadata={
            "help": "Load MXFP4-quantized weights (gpt-oss) dequantized to the recipe's dtype, for training "
            "(transformers' Mxfp4Config(dequantize=True))."
        },
    )
    chat_format: str = field(
        default="auto",
        metadata={
            "help": "Model family to render the examples in: auto (from the chat template), a family name, or "
            "verbatim.",
            "choices": list(FORMAT_NAMES),
        },
    )
    chat_format_turn: str | None = field(
        default=None,
        metadata={
            "help": "The assistant turn as the model writes it after the generation prompt, with {trace} and "
            "{answer}, for a family the table does not know: e.g. '<think>{trace}</think>{answer}<|im_end|>'."
        },
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Chat template variables, a mapping (JSON on the command line): {reasoning_effort: high}."},
    )

    def __post_init__(self):
        # TRL's __post_init__ would make TRL DatasetConfigs of the recipe's dicts: make ours, with `column_map`
        self.datasets = [
            SafeKeyDatasetConfig(**dataset) if isinstance(dataset, dict) else dataset for dataset in self.datasets
        ]
        if self.streaming:
            raise ValueError("SafeKey data mixtures are featurised up front: `streaming` is not supported.")
        if isinstance(self.chat_template_kwargs, str):  # from the command line
            try:
                self.chat_template_kwargs = json.loads(self.chat_template_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"chat_template_kwargs {self.chat_template_kwargs!r} is not JSON: {error}") from None
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a mapping, got {self.chat_template_kwargs!r}.")
