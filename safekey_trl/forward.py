"""SafeKey's passes inside the model's own forward: the safety head on the main pass's last hidden states, and the
query-masked pass.

One call of the model per micro-batch runs all three, so that every way of distributing it sees the one forward it
expects. DDP finds the parameters in use from that call's output; FSDP and ZeRO-3 gather the head's weights as for any
layer; and ZeRO-3's parameter trace, which it records over the modules run between two calls of the model and uses to
prefetch weights and keep small ones resident, sees the same modules in the same order every step. A second call of
the model would start a new trace half-way through each step, and ZeRO-3 would then gather every weight on demand,
the head's again in the backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .heads import HEAD_ATTRIBUTE, DualPathSafetyHead


@contextlib.contextmanager
def capture_last_hidden_state(backbone: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the backbone's `last_hidden_state` during the block.

    TRL's fused LM head runs the backbone and returns log-probabilities only, so the hidden states the safety head
    needs are taken from the backbone's output as it passes, at no extra cost.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured["last_hidden_state"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = backbone.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def attach_safekey_forward(causal_lm: nn.Module, head: DualPathSafetyHead, sink: dict[str, Any]) -> None:
    """Make `head` a submodule of `causal_lm`, and let the model's forward run SafeKey's passes.

    With `safekey_head_inputs={"rows", "understanding_mask", "prefix_mask", "detach"}`, the forward pools the last
    hidden states of those rows through the head; with `safekey_qmm_inputs={"input_ids", "attention_mask",
    "logits_to_keep"}`, it then runs the query-masked pass on them (the plain LM head, the kept positions only). The
    head's logits and the query-masked pass's logits go to `sink["head_logits"]` and `sink["qmm_logits"]` and into the
    output. Without either keyword the forward is unchanged.
    """
    setattr(causal_lm, HEAD_ATTRIBUTE, head)
    original_forward = causal_lm.forward

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(causal_lm).forward)
    def forward(
        self,
        *args: Any,
        safekey_head_inputs: dict[str, Any] | None = None,
        safekey_qmm_inputs: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        if safekey_head_inputs is None and safekey_qmm_inputs is None:
            return original_forward(*args, **kwargs)
        extra = {}
        with capture_last_hidden_state(self.base_model) as captured:
            outputs = original_forward(*args, **kwargs)
        if safekey_head_inputs is not None:
            hidden_states = captured["last_hidden_state"][safekey_head_inputs["rows"]]
            if safekey_head_inputs["detach"]:
                hidden_states = hidden_states.detach()
            logits = getattr(self, HEAD_ATTRIBUTE)(
                hidden_states, safekey_head_inputs["understanding_mask"], safekey_head_inputs["prefix_mask"]
            )
            sink["head_logits"] = logits
            extra["safekey_head_logits"] = torch.stack(logits, dim=-1)
        if safekey_qmm_inputs is not None:
            masked = original_forward(**safekey_qmm_inputs, fused_lm_head=False, use_cache=False)
            sink["qmm_logits"] = extra["safekey_qmm_logits"] = masked.logits
        return _with_safekey_outputs(type(outputs))(**outputs, **extra)

    causal_lm.forward = types.MethodType(forward, causal_lm)


@functools.cache
def _with_safekey_outputs(output_type: type) -> type:
    """`output_type` (a `ModelOutput` dataclass) with fields for the head's and the query-masked pass's logits.
    Declared fields, since DDP rebuilds the output from its fields when it walks it for the parameters in use."""
    return dataclasses.make_dataclass(
        f"{output_type.__name__}WithSafeKey",
        [
            ("safekey_head_logits", torch.Tensor | None, dataclasses.field(default=None)),
            ("safekey_qmm_logits", torch.Tensor | None, dataclasses.field(default=None)),
        ],
        bases=(output_type,),
    )
