"""The LM term's head on devices without Triton: TRL's fused-LM-head contract, in a kernel that is fast on a CPU.

TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, installed by `SFTTrainer`) never builds the
`(tokens, vocab)` logits: it projects tiles of 4096 tokens by 32,768 vocabulary entries and folds each into running
log-sum-exp statistics. On CUDA and XPU a Triton kernel does the fold. Elsewhere its torch fallback makes about ten
elementwise passes over every 512 MB tile, forward and backward, which on a CPU is 2.5 to 3.5 times slower than
building the full logits (`docs/benchmarks.md`).

[`TiledLogProbs`] computes the same per-token quantities with tiles of a few hundred tokens across the whole
vocabulary and in-place folds (max, exp, sum; the backward recomputes the tile and turns it into the logits gradient
where it lies), which on a CPU costs less than the full logits and holds at most two tiles. [`add_tiled_lm_head`]
routes `model(..., fused_lm_head=True)` through it where Triton does not run, and returns TRL's own
`FusedCausalLMOutput`, so `SFTTrainer.compute_loss` and its metrics are unchanged. Everything it does not cover
(logit scaling or soft-capping, MoE router losses, sharded LM heads, Triton devices) goes to TRL's forward.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import is_triton_available
from trl.trainer.utils import FusedCausalLMOutput

# A tile holds `tokens_per_tile` rows of float32 logits across the whole vocabulary, and the forward holds two: this
# budget keeps them a few hundred tokens wide for 32k-256k vocabularies, wide enough for the GEMMs to run at speed
# and small enough to cost little next to the activations.
TILE_BYTES = 128 * 2**20

# Config attributes that make TRL's fused head transform the logits (scale, soft-cap); such models go to TRL's path
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def tokens_per_tile(vocab_size: int, tile_bytes: int = TILE_BYTES) -> int:
    """Rows of float32 logits per tile: as many as fit in `tile_bytes`, at least 16."""
    return max(16, tile_bytes // (4 * vocab_size))


def triton_runs_on(device: torch.device) -> bool:
    """Whether TRL's fused LM head runs its Triton kernel on `device` (the condition TRL's kernel checks)."""
    return device.type in ("cuda", "xpu") and is_triton_available()


class TiledLogProbs(torch.autograd.Function):
    """Per-token `log softmax(hidden @ weight.T + bias)[target]`, with each token's entropy and whether the target is
    the first argmax (both without gradient: TRL's metrics use them), holding at most two `(tile_tokens, vocab)`
    float32 tiles. The backward recomputes each tile and accumulates the gradients in float32."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        targets: torch.Tensor,  # (N,)
        tile_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device, num_tokens = hidden.device, hidden.shape[0]
        compute_dtype = (
            torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        )
        log_z = torch.empty(num_tokens, device=device, dtype=torch.float32)
        log_probs = torch.empty_like(log_z)
        entropy = torch.empty_like(log_z)
        is_top1 = torch.empty(num_tokens, device=device, dtype=torch.bool)
        weight_c = weight.to(compute_dtype)
        logits_buffer = _tile_buffer(num_tokens, tile_tokens, weight)
        exp_buffer = torch.empty_like(logits_buffer)
        for start in range(0, num_tokens, tile_tokens):
            rows = slice(start, start + tile_tokens)
            logits = _project(hidden[rows], weight_c, bias, compute_dtype, logits_buffer)
            exp = exp_buffer[: logits.shape[0]]
            target_logit = logits.gather(1, targets[rows, None]).squeeze(1)
            # `max` returns the first maximum's index, as `argmax` does (and in a third of `argmax`'s time on a CPU)
            row_max, top1 = logits.max(dim=-1)
            is_top1[rows] = top1 == targets[rows]
            shifted = logits.sub_(row_max[:, None])  # z - max, in place
            torch.exp(shifted, out=exp)
            sum_exp = exp.sum(dim=-1)
            # entropy = log Z - E_p[z] = log(sum_exp) - sum(exp * (z - max)) / sum_exp
            entropy[rows] = sum_exp.log() - exp.mul_(shifted).sum(dim=-1) / sum_exp
            log_z[rows] = row_max + sum_exp.log()
            log_probs[rows] = target_logit - log_z[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.tile_tokens = tile_tokens
        ctx.compute_dtype = compute_dtype
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_log_probs is None:
            return None, None, None, None, None
        compute_dtype, tile_tokens = ctx.compute_dtype, ctx.tile_tokens
        weight_c = weight.to(compute_dtype)
        weight_f = weight.float()
        grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if needs_bias else None
        grad_log_probs = grad_log_probs.float()
        logits_buffer = _tile_buffer(hidden.shape[0], tile_tokens, weight)
        for start in range(0, hidden.shape[0], tile_tokens):
            rows = slice(start, start + tile_tokens)
            grad = grad_log_probs[rows, None]
            # d log p_target / dz_j = 1[j = target] - p_j, built where the tile lies: -g·p, then +g at the target
            logits = _project(hidden[rows], weight_c, bias, compute_dtype, logits_buffer)
            tile = logits.sub_(log_z[rows, None]).exp_().mul_(-grad)
            tile.scatter_add_(1, targets[rows, None], grad)
            if grad_hidden is not None:
                grad_hidden[rows] = tile @ weight_f
            if grad_weight is not None:
                grad_weight.addmm_(tile.t(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias += tile.sum(dim=0)
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
        )


def _tile_buffer(num_tokens: int, tile_tokens: int, weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised float32 tile: as many rows as the widest tile of `num_tokens` needs, the vocabulary wide."""
    rows = min(tile_tokens, max(num_tokens, 1))
    return torch.empty(rows, weight.shape[0], device=weight.device, dtype=torch.float32)


def _project(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """One tile of logits in `compute_dtype`, written as float32 into (the first rows of) `buffer`."""
    out = buffer[: hidden.shape[0]]
    if compute_dtype == torch.float32:
        torch.mm(hidden.float(), weight.t(), out=out)
        if bias is not None:
            out += bias.float()
    else:
        logits = hidden.to(compute_dtype) @ weight.t()
        if bias is not None:
            logits += bias.to(compute_dtype)
        out.copy_(logits)
    return out


def _is_sharded(weight: torch.Tensor) -> bool:
    """A ZeRO-3 partition or an FSDP2 shard, which TRL's forward gathers before projecting."""
    if hasattr(weight, "ds_id"):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(weight, DTensor)


def supports_tiled_lm_head(model: PreTrainedModel) -> bool:
    """Whether `model`'s LM head is a plain projection that [`TiledLogProbs`] computes exactly."""
    text_config = model.config.get_text_config()
    if any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    return not getattr(text_config, "output_router_logits", False)


def add_tiled_lm_head(model: PreTrainedModel, tile_bytes: int = TILE_BYTES, always: bool = False) -> bool:
    """Route `model(..., fused_lm_head=True)` through [`TiledLogProbs`] where TRL's Triton kernel does not run.

    Call it after TRL's `add_fused_lm_head` (which `SFTTrainer.__init__` calls): the forward it installs still serves
    every other call. `always=True` uses the tiled kernel on Triton devices too. Returns whether the model was patched
    (False for the models [`supports_tiled_lm_head`] turns away).
    """
    if not supports_tiled_lm_head(model):
        return False
    fused_forward = model.forward

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def forward(
        self: PreTrainedModel,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        # The LM head is looked up on each call, since FSDP and PEFT replace modules after patching
        lm_head = self.get_output_embeddings()
        weight = lm_head.weight
        if (
            not fused_lm_head
            or (triton_runs_on(weight.device) and not always)
            or kwargs.get("output_router_logits")
            or _is_sharded(weight)
        ):
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return fused_forward(*args, fused_lm_head=fused_lm_head, **kwargs)

        kwargs["use_cache"] = False
        hidden_states = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden_states, labels = hidden_states[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        hidden_states = hidden_states.to(weight.device)
        labels = labels.to(weight.device)
        mask = labels != -100
        # Only the positions with a label are projected
        per_token = TiledLogProbs.apply(
            hidden_states[mask], weight, lm_head.bias, labels[mask], tokens_per_tile(weight.shape[0], tile_bytes)
        )
        # `masked_scatter` keeps the output connected to the model even when no label is valid
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True
