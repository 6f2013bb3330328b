"""Tiny models of each reasoning family's own architecture train with all three terms, on examples rendered in the
family's format; the query-masked pass's loss equals a full-logits computation and does not see the query."""

from __future__ import annotations

import pytest
import torch
from conftest import make_example
from helpers import first_batch, make_trainer

from safekey_trl.data import featurize
from safekey_trl.tiny import build_tiny_model, tiny_tokenizer

# The architecture, and the attention it runs with (gpt-oss has no sdpa path: its attention sinks need eager)
ARCHITECTURES = {
    "qwen3": "sdpa",
    "gpt_oss": "eager",
    "glm4_moe": "sdpa",
    "nemotron_h": "sdpa",
    "gemma4_text": "sdpa",
}
# What makes each the family's architecture rather than a plain decoder
SIGNATURE_MODULE = {
    "qwen3": "q_norm",
    "gpt_oss": "sinks",
    "glm4_moe": "shared_experts",
    "nemotron_h": "mixer.conv1d",  # (and an MoE layer)
    "gemma4_text": "post_feedforward_layernorm",
}


def family_examples() -> list:
    return [
        make_example(
            question=f"Question {i}: how do I do thing {i}?",
            key=" But wait, this could be used to hurt someone." if i % 2 == 0 else " That is a normal task.",
            unsafe=i % 2 == 0,
        )
        for i in range(4)
    ]


def query_masked_reference(model, batch) -> float:
    """The QMM loss summed over K's tokens, from full logits of a pass that attends with the query mask."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["query_mask"]).logits.double()
    log_probs = logits[:, :-1].log_softmax(-1)
    targets = batch["input_ids"][:, 1:]
    picked = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(picked[batch["key_mask"][:, 1:].bool()].sum())


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_family_architecture_trains_all_terms_with_an_exact_query_masked_loss(tmp_path, architecture):
    tokenizer = tiny_tokenizer(architecture)
    model = build_tiny_model(tokenizer, architecture, attn_implementation=ARCHITECTURES[architecture])
    assert any(SIGNATURE_MODULE[architecture] in name for name, _ in model.named_modules()) or any(
        SIGNATURE_MODULE[architecture] in name for name, _ in model.named_parameters()
    )
    dataset, _ = featurize(family_examples(), tokenizer)
    trainer = make_trainer(tmp_path, model, tokenizer, dataset, max_steps=1)

    model.eval()
    batch = first_batch(trainer)
    safekey = {name: batch[name] for name in ("key_mask", "query_mask")}
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask")}
    has_key = batch["key_mask"].any(dim=1)
    assert bool(has_key.all())
    with torch.no_grad():
        qmm, key_tokens, _ = trainer._query_masked_pass(model, inputs, safekey, has_key)
    assert int(key_tokens) == int(batch["key_mask"].sum())
    assert float(qmm) == pytest.approx(query_masked_reference(model, batch), rel=1e-5)
    # The query is hidden: other query tokens give the same loss, another U token does not
    query = (batch["query_mask"] == 0) & (batch["attention_mask"] == 1)
    changed = dict(inputs, input_ids=inputs["input_ids"].masked_fill(query, 42))
    with torch.no_grad():
        assert float(trainer._query_masked_pass(model, changed, safekey, has_key)[0]) == pytest.approx(
            float(qmm), rel=1e-6
        )
        first_u = batch["understanding_span"][:, 0]
        u_changed = inputs["input_ids"].clone()
        u_changed[torch.arange(4), first_u] = 42
        assert float(trainer._query_masked_pass(model, dict(inputs, input_ids=u_changed), safekey, has_key)[0]) != (
            pytest.approx(float(qmm), rel=1e-6)
        )

    model.train()
    head_before = trainer.safety_head.understanding_head.bias.detach().clone()
    trainer.train()
    logged = trainer.state.log_history[0]
    for term in ("lm_loss", "qmm_loss", "head_loss"):
        assert torch.isfinite(torch.tensor(logged[term])), term
    assert logged["loss"] == pytest.approx(
        logged["lm_loss"] + 0.2 * logged["qmm_loss"] + 0.2 * logged["head_loss"], rel=1e-4
    )
    assert not torch.equal(trainer.safety_head.understanding_head.bias, head_before)


def test_a_causal_lm_without_logits_to_keep_is_refused_at_start(tmp_path, tokenizer, examples):
    from transformers import Qwen2ForCausalLM

    class NoLogitsToKeep(Qwen2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    model = build_tiny_model(tokenizer)
    model.__class__ = NoLogitsToKeep
    with pytest.raises(ValueError, match="NoLogitsToKeep.forward takes no `logits_to_keep`"):
        make_trainer(tmp_path, model, tokenizer, examples)
