"""The Dual-Path Safety Head: two linear probes on the last hidden layer, used in training only."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_WEIGHTS_NAME = "safekey_head.safetensors"
# Attribute under which the trainer attaches the head to the causal LM (`forward.attach_safekey_forward`), so that
# accelerate, DeepSpeed and FSDP treat its parameters like the model's own; `_save` strips it back out of the export.
HEAD_ATTRIBUTE = "safekey_head"


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden_states` (batch, length, hidden) over the positions where `mask` (batch, length) is true."""
    weights = mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class Float32Linear(nn.Linear):
    """`nn.Linear` computed in float32 whatever its weights' dtype and any autocast around it.

    Called as a module (not through its weights), so that ZeRO-3 and FSDP gather its parameters as for any layer.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            bias = self.bias.float() if self.bias is not None else None
            return F.linear(input.float(), self.weight.float(), bias)


class DualPathSafetyHead(nn.Module):
    """Two `Linear(hidden, 1)` heads predicting "the query is harmful".

    The understanding path mean-pools the last hidden states over the query understanding U; the prefix path
    mean-pools over everything before the key sentence K (prompt and U). Pooling, logits and loss are computed in
    float32 whatever the model's dtype or autocast; every parameter, biases included, trains. The parameters are
    float32 too, except where DeepSpeed holds them (one dtype for the whole model: [`SafeKeySFTTrainer`] casts
    the head to it).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.understanding_head = Float32Linear(hidden_size, 1)
        self.prefix_head = Float32Linear(hidden_size, 1)

    def forward(
        self, hidden_states: torch.Tensor, understanding_mask: torch.Tensor, prefix_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the float32 `(understanding_logits, prefix_logits)`, each of shape (batch,)."""
        with torch.autocast(hidden_states.device.type, enabled=False):
            hidden_states = hidden_states.float()
            understanding = masked_mean(hidden_states, understanding_mask)
            prefix = masked_mean(hidden_states, prefix_mask)
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
