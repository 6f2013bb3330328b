"""The three loss terms against a straightforward computation, the query mask's invariance, the schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import first_batch, make_trainer

from safekey_trl.losses import auxiliary_active, safety_head_loss


def reference_losses(model, head, batch, theta=0.5, mask_query=True):
    """The SafeKey loss the plain way: full-length passes, full logits, loops over tokens and examples."""
    causal_lm = model
    with torch.no_grad():
        hidden = causal_lm.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = causal_lm.lm_head(hidden)
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        second_mask = batch["query_mask"] if mask_query else batch["attention_mask"]
        masked_hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=second_mask).last_hidden_state
        masked_logits = causal_lm.lm_head(masked_hidden).double()
        key_losses = []
        head_losses = []
        for b in range(batch["input_ids"].shape[0]):
            for p in range(batch["input_ids"].shape[1]):
                if batch["key_mask"][b, p]:
                    key_losses.append(-masked_logits[b, p - 1].log_softmax(-1)[batch["input_ids"][b, p]].item())
            if not batch["key_mask"][b].any():
                continue
            start, end = batch["understanding_span"][b].tolist()
            prefix_end = int(batch["prefix_end"][b])
            y = float(batch["unsafe"][b])
            terms = []
            for linear, pooled in (
                (head.understanding_head, hidden[b, start:end].mean(0)),
                (head.prefix_head, hidden[b, :prefix_end].mean(0)),
            ):
                z = float(linear(pooled))
                sigma = 1 / (1 + math.exp(-z))
                terms.append(-(y * math.log(sigma) + (1 - y) * math.log(1 - sigma)))
            head_losses.append(theta * terms[0] + (1 - theta) * terms[1])
    return lm.item(), sum(key_losses) / len(key_losses), sum(head_losses) / len(head_losses)


@pytest.mark.parametrize("lm_head_kernel", ["trl", "tiled"])
@pytest.mark.parametrize("mask_query", [True, False])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_total_loss_equals_hand_computation(
    tmp_path, make_model, tokenizer, examples, mask_query, attn_implementation, lm_head_kernel
):
    model = make_model(attn_implementation=attn_implementation)
    trainer = make_trainer(
        tmp_path, model, tokenizer, examples, qmm_mask_query=mask_query, head_theta=0.3, lm_head_kernel=lm_head_kernel
    )
    model.eval()
    batch = first_batch(trainer)
    lm, qmm, head = reference_losses(model, trainer.safety_head, batch, theta=0.3, mask_query=mask_query)
    with torch.no_grad():
        local = trainer.compute_loss(model, dict(batch)).item()
        # As the Trainer calls it: normalised by counts over the whole (here: one-batch) accumulation window
        num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        global_ = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items).item()
    expected = lm + 0.2 * qmm + 0.2 * head
    assert local == pytest.approx(expected, rel=1e-5)
    assert global_ == pytest.approx(expected, rel=1e-5)
    # Both calls' terms are in the logging window: the same batch twice, so the same means
    logs = {}
    trainer.log(logs)
    assert logs["eval_lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert logs["eval_qmm_loss"] == pytest.approx(qmm, rel=1e-5)
    assert logs["eval_head_loss"] == pytest.approx(head, rel=1e-5)


def test_gradient_accumulation_normalises_by_the_whole_window(tmp_path, make_model, tokenizer, examples):
    """Two micro-batches of 2 with counts over both give the gradient of one batch of 4."""
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples)
    batch = first_batch(trainer)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items).backward()
    whole = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    num_items = trainer._get_num_items_in_batch(halves, torch.device("cpu"))
    for half in halves:
        # Each half is padded to the full batch's length; padding changes nothing
        trainer.compute_loss(model, dict(half), num_items_in_batch=num_items).backward()
    for name, p in model.named_parameters():
        if name in whole:
            torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-6)
    assert any("safekey_head" in name for name in whole)


def _qmm(trainer, model, batch):
    safekey = {name: batch[name] for name in ("key_mask", "query_mask")}
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return trainer._query_masked_pass(model, inputs, safekey, batch["key_mask"].any(dim=1))[0]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_query_mask_hides_the_query(tmp_path, make_model, tokenizer, examples, attn_implementation):
    model = make_model(attn_implementation=attn_implementation)
    trainer = make_trainer(tmp_path, model, tokenizer, examples)
    model.eval()
    batch = first_batch(trainer)
    base = _qmm(trainer, model, batch)
    assert torch.isfinite(base)
    query = (batch["query_mask"] == 0) & (batch["attention_mask"] == 1)
    changed = dict(batch, input_ids=batch["input_ids"].masked_fill(query, 42))
    assert torch.equal(_qmm(trainer, model, changed), base)  # to the bit
    first_u = batch["understanding_span"][:, 0]
    u_changed = batch["input_ids"].clone()
    u_changed[torch.arange(len(first_u)), first_u] = 42
    assert not torch.equal(_qmm(trainer, model, dict(batch, input_ids=u_changed)), base)
    # Without the query mask (the ablation), the query matters
    trainer.args.qmm_mask_query = False
    assert not torch.equal(_qmm(trainer, model, changed), _qmm(trainer, model, batch))


def test_head_detach_ablation_keeps_the_head_gradient_out_of_the_model(tmp_path, make_model, tokenizer, examples):
    grads = {}
    for name, overrides in {"detached": {"head_detach_hidden": True}, "no_head": {"head_weight": 0.0}}.items():
        model = make_model()
        trainer = make_trainer(tmp_path, model, tokenizer, examples, **overrides)
        trainer.compute_loss(model, first_batch(trainer)).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["no_head"].items():
        if "safekey_head" in name:
            assert grad is None
            assert grads["detached"][name].abs().sum() > 0  # the head still learns
        else:
            torch.testing.assert_close(grads["detached"][name], grad)  # L_LM and L_QMM unchanged


def test_safety_head_loss_formula():
    z_u, z_p, y = torch.tensor([0.3, -1.2]), torch.tensor([2.0, 0.1]), torch.tensor([1.0, 0.0])
    expected = [
        0.25 * -math.log(1 / (1 + math.exp(-0.3))) + 0.75 * -math.log(1 / (1 + math.exp(-2.0))),
        0.25 * -math.log(1 - 1 / (1 + math.exp(1.2))) + 0.75 * -math.log(1 - 1 / (1 + math.exp(-0.1))),
    ]
    assert safety_head_loss(z_u, z_p, y, theta=0.25).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "epoch,expected",
    [(None, False), (0.0, False), (2.99, False), (3.0, True), (3.5, True), (4.99, True), (5.0, True)],
)
def test_auxiliary_terms_cover_the_last_two_of_five_epochs(epoch, expected):
    assert auxiliary_active(epoch, num_train_epochs=5, auxiliary_epochs=2) is expected


def test_auxiliary_epochs_edges():
    assert auxiliary_active(0.0, num_train_epochs=2, auxiliary_epochs=2)
    assert auxiliary_active(0.0, num_train_epochs=2, auxiliary_epochs=5)
    assert not auxiliary_active(1.9, num_train_epochs=2, auxiliary_epochs=0)


def test_head_computes_in_float32_under_bf16_autocast(tmp_path, make_model, tokenizer, examples):
    """bf16 mixed precision runs the model under autocast; the head stays float32: its parameters, its pooling of the
    last hidden states and its logits, so its loss and the logged `head_loss` are not bf16-rounded."""
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples, bf16=True)
    head = trainer.safety_head
    assert all(parameter.dtype == torch.float32 for parameter in head.parameters())
    batch = first_batch(trainer)
    captured = []  # the main pass's last hidden states come first
    hook = model.model.register_forward_hook(lambda m, a, out: captured.append(getattr(out, "last_hidden_state", out)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the forward in
        trainer.compute_loss(model, dict(batch))
    hook.remove()
    understanding_logits, prefix_logits = trainer._safekey_outputs["head_logits"]
    assert understanding_logits.dtype == prefix_logits.dtype == torch.float32
    rows = batch["key_mask"].any(dim=1)
    hidden = captured[0][rows].double()
    expected = []
    for b, (start, end), prefix_end in zip(
        range(len(hidden)), batch["understanding_span"][rows].tolist(), batch["prefix_end"][rows].tolist(), strict=True
    ):
        u = hidden[b, start:end].mean(0) @ head.understanding_head.weight.double()[0] + head.understanding_head.bias
        p = hidden[b, :prefix_end].mean(0) @ head.prefix_head.weight.double()[0] + head.prefix_head.bias
        expected.append((float(u), float(p)))
    expected = torch.tensor(expected)
    torch.testing.assert_close(understanding_logits.detach(), expected[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prefix_logits.detach(), expected[:, 1], rtol=1e-5, atol=1e-6)
