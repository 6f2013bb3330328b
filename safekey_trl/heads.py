"""The Dual-Path Safety Head: two linear probes on the last hidden layer, used in training only."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_WEIGHTS_NAME = "safekey_head.safetensors"
# Attribute under which the trainer attaches the head to the causal LM, so that accelerate, DeepSpeed and FSDP
# treat its parameters like the model's own; `_save` strips it back out of the exported model.
HEAD_ATTRIBUTE = "safekey_head"


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden_states` (batch, length, hidden) over the positions where `mask` (batch, length) is true."""
    weights = mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class DualPathSafetyHead(nn.Module):
    """Two `Linear(hidden, 1)` heads predicting "the query is harmful".

    The understanding path mean-pools the last hidden states over the query understanding U; the prefix path
    mean-pools over everything before the key sentence K (prompt and U). Both run in float32 whatever the model's
    dtype, and every parameter, biases included, trains.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.understanding_head = nn.Linear(hidden_size, 1)
        self.prefix_head = nn.Linear(hidden_size, 1)

    def forward(
        self, hidden_states: torch.Tensor, understanding_mask: torch.Tensor, prefix_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the `(understanding_logits, prefix_logits)`, each of shape (batch,)."""
        dtype = self.understanding_head.weight.dtype
        understanding = masked_mean(hidden_states, understanding_mask).to(dtype)
        prefix = masked_mean(hidden_states, prefix_mask).to(dtype)
        return self.understanding_head(understanding).squeeze(-1), self.prefix_head(prefix).squeeze(-1)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the head to `directory/safekey_head.safetensors`."""
        return save_head_state(self.state_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DualPathSafetyHead:
        """Load a head written by `save_pretrained` (or saved beside a SafeKey model or checkpoint)."""
        state = load_file(str(Path(directory) / HEAD_WEIGHTS_NAME))
        head = cls(state["understanding_head.weight"].shape[-1])
        head.load_state_dict(state)
        return head


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


def attach_safety_head(causal_lm: nn.Module, head: DualPathSafetyHead, sink: dict[str, Any]) -> None:
    """Make `head` a submodule of `causal_lm` and run it inside the model's forward.

    Called with `safekey_head_inputs={"rows", "understanding_mask", "prefix_mask", "detach"}`, the forward also pools
    the last hidden states of those rows through the head, puts the logits in `sink["logits"]` and in its output.
    Running inside the forward is what data parallelism needs: DDP finds the head's parameters used from the output,
    FSDP and ZeRO-3 have them gathered, as for any other layer. Without the keyword the forward is unchanged.
    """
    setattr(causal_lm, HEAD_ATTRIBUTE, head)
    original_forward = causal_lm.forward

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(causal_lm).forward)
    def forward(self, *args: Any, safekey_head_inputs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if safekey_head_inputs is None:
            return original_forward(*args, **kwargs)
        with capture_last_hidden_state(self.base_model) as captured:
            outputs = original_forward(*args, **kwargs)
        hidden_states = captured["last_hidden_state"][safekey_head_inputs["rows"]]
        if safekey_head_inputs["detach"]:
            hidden_states = hidden_states.detach()
        logits = getattr(self, HEAD_ATTRIBUTE)(
            hidden_states, safekey_head_inputs["understanding_mask"], safekey_head_inputs["prefix_mask"]
        )
        sink["logits"] = logits
        return _with_head_logits(type(outputs))(**outputs, safekey_head_logits=torch.stack(logits, dim=-1))

    causal_lm.forward = types.MethodType(forward, causal_lm)


@functools.cache
def _with_head_logits(output_type: type) -> type:
    """`output_type` (a `ModelOutput` dataclass) with one more field for the head's logits. A declared field, since
    DDP rebuilds the output from its fields when it walks it for the parameters in use."""
    return dataclasses.make_dataclass(
        f"{output_type.__name__}WithSafetyHead",
        [("safekey_head_logits", torch.Tensor | None, dataclasses.field(default=None))],
        bases=(output_type,),
    )


def save_head_state(state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """Write a head state dict (keys relative to the head) to `directory/safekey_head.safetensors`."""
    path = Path(directory) / HEAD_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().contiguous().cpu() for key, value in state.items()}, str(path))
    return path


def split_head_state(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a model state dict into the head's entries (relative keys) and the clean causal LM's entries."""
    marker = f"{HEAD_ATTRIBUTE}."
    head_state, model_state = {}, {}
    for key, value in state_dict.items():
        if marker in key:
            head_state[key.split(marker, 1)[1]] = value
        else:
            model_state[key] = value
    return head_state, model_state
