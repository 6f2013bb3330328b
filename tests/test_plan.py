"""`train --dry-run` on a machine without a GPU: the FLOP count, SafeKey's and the reference's extra cost, the real
recipes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.plan import KNOWN_CONFIGS, QMM_SEQUENCE_SHARE, ModelShape, plan_recipe, training_step_macs
from safekey_trl.sft import parse_recipe

QWEN_7B = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


def qwen7b_shape() -> ModelShape:
    model_type, fields = KNOWN_CONFIGS[QWEN_7B]
    return ModelShape.from_config(AutoConfig.for_model(model_type, **fields))


def test_flop_count_of_the_7b_model_by_hand():
    shape = qwen7b_shape()
    # q and o: 3584 x 3584 each; k and v: 3584 x (4 KV heads x 128); gate, up, down: 3584 x 18944 each
    per_layer = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
    assert shape.linear_macs_per_token() == 28 * per_layer == 6_525_288_448
    assert shape.head_macs_per_token() == 3584 * 152064 == 544_997_376
    # Causal attention: position t attends to t + 1 positions, scores and weighted sum, 28 heads x 128
    assert shape.attention_macs(4) == 28 * 2 * 3584 * (1 + 2 + 3 + 4)
    # The "about 7%": the LM head's share of a forward at 4,096 tokens
    assert 0.07 < shape.head_share(4096) < 0.075


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_linear_multiply_adds_are_the_models_matmul_weights(name):
    """One multiply-add per weight per token: the count equals the weights of the layers' and the head's Linears."""
    model_type, fields = KNOWN_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    shape = ModelShape.from_config(config)
    assert shape.linear_macs_per_token() == sum(m.weight.numel() for n, m in linears if n != "lm_head")
    assert shape.head_macs_per_token() == model.lm_head.weight.numel()


def test_training_step_multiplies_the_passes():
    shape = ModelShape(hidden=8, intermediate=16, layers=1, heads=2, kv_heads=1, vocab=10)
    linear, attention, head = 5 * shape.linear_macs_per_token(), shape.attention_macs(5), 5 * 80
    assert training_step_macs(shape, 5) == 3 * linear + 3 * attention + 3 * head
    # Frozen weights (LoRA): no weight gradients; gradient checkpointing: the layers' forward again
    assert training_step_macs(shape, 5, train_weights=False, train_head=False, recompute=True) == (
        3 * linear + 4 * attention + 2 * head
    )
    assert training_step_macs(shape, 5, projected=1) == 3 * linear + 3 * attention + 3 * 80


def test_real_recipes_parse_for_planning_but_not_for_training_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("the bf16 check only stops a machine without a GPU")
    # A real run keeps transformers' check; the dry run plans anyway
    with pytest.raises(ValueError, match="bf16"):
        parse_recipe("qwen7b-qlora")
    assert plan_recipe("qwen7b-qlora").model == QWEN_7B


@pytest.mark.parametrize(
    ("recipe", "trainable", "total_gib"),
    [("qwen7b-qlora", "40,377,346 trainable", (6, 12)), ("qwen7b", "7,615,623,682 trainable", (80, 100))],
)
def test_dry_run_of_the_real_recipes_on_a_cpu(recipe, trainable, total_gib):
    result = CliRunner().invoke(app, ["train", "--recipe", recipe, "--dry-run"])
    assert result.exit_code == 0, result.output
    output = result.output
    assert "7,615,616,512 total, " + trainable in output
    assert "SafeKey adds" in output and "the reference's way adds" in output
    assert f"K assumed to end at {QMM_SEQUENCE_SHARE:.0%}" in output

    plan = plan_recipe(recipe)
    assert total_gib[0] < plan.total / 2**30 < total_gib[1]
    costs = plan.costs
    assert costs.tokens == 8192 and costs.key_end == round(0.15 * 8192)
    # The query-masked pass runs over 15% of the sequence, attention there is (15%)^2 of the full one: SafeKey adds
    # a little under 15% of the layers' compute, the reference a whole second step
    assert 0.10 < costs.safekey_extra_macs / costs.plain_macs < QMM_SEQUENCE_SHARE
    assert costs.reference_extra_macs == costs.plain_macs
    # SafeKey's memory: the short pass's activations and 32 K tokens' logits; the reference's: two sets of full
    # 8,192 x 152,064 logits (10 bytes each), minus the fused head's tiles, plus a second pass's activations
    assert costs.safekey_extra_memory == pytest.approx(plan.query_masked_pass, rel=1e-3)
    full_logits = 8192 * 152064 * 10
    assert costs.reference_extra_memory == pytest.approx(
        2 * full_logits - plan.lm_head_buffers + plan.activations, rel=1e-3
    )
    assert costs.reference_extra_memory > 20 * costs.safekey_extra_memory
    assert plan.total == pytest.approx(costs.plain_memory + costs.safekey_extra_memory)


class ClosingServer:
    """A loopback TCP server that accepts each connection and closes it without a word, as a network that drops
    everything would; it counts the connections."""

    def __init__(self) -> None:
        import socket
        import threading

        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.socket.close()


def test_dry_run_without_network_plans_offline_at_once(tmp_path):
    """Without `HF_HUB_OFFLINE` and without a network, the dry run asks the Hub once, briefly, and plans from the
    built-in shape: no retries (the Hub client would try five times, about 30 s on a machine with no route)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    with ClosingServer() as server:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": f"http://127.0.0.1:{server.socket.getsockname()[1]}",
            "HF_HOME": str(tmp_path / "hf"),  # an empty cache
            "PYTHONPATH": str(ROOT),
        }
        command = [sys.executable, "-m", "safekey_trl", "train", "--config", "qwen3-8b", "--dry_run"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert server.connections == 1
    output = " ".join(result.stdout.split())
    assert "Qwen/Qwen3-8B's config could not be read (offline: the Hub did not answer" in output
    assert "8,190,735,360 total" in output
