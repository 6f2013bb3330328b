"""The tiled LM-head kernel: TRL's fused-LM-head quantities, exactly, on devices without Triton."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import first_batch, make_config, make_trainer
from trl.trainer.utils import add_fused_lm_head

from safekey_trl.lm_head import TiledLogProbs, add_tiled_lm_head, supports_tiled_lm_head, tokens_per_tile

TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _full_logits_reference(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    log_probs = -F.cross_entropy(logits, targets, reduction="none")
    probabilities = logits.softmax(dim=-1)
    entropy = -(probabilities * logits.log_softmax(dim=-1)).sum(dim=-1)
    return log_probs, entropy.detach(), logits.argmax(dim=-1) == targets


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tile_tokens", [1, 7, 64])
def test_kernel_equals_the_full_logits(with_bias, tile_tokens):
    """Values and gradients, with tiles that do not divide the tokens and a per-token upstream gradient (as DFT's)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=generator, requires_grad=True)
    weight = torch.randn(101, 16, generator=generator).requires_grad_()
    bias = torch.randn(101, generator=generator).requires_grad_() if with_bias else None
    targets = torch.randint(0, 101, (23,), generator=generator)
    targets[::3] = F.linear(hidden, weight, bias)[::3].argmax(dim=-1)  # some tokens top-1
    upstream = torch.randn(23, generator=generator)
    leaves = [hidden, weight] + ([bias] if with_bias else [])

    log_probs, entropy, is_top1 = TiledLogProbs.apply(hidden, weight, bias, targets, tile_tokens)
    grads = torch.autograd.grad((log_probs * upstream).sum(), leaves)
    expected_log_probs, expected_entropy, expected_top1 = _full_logits_reference(hidden, weight, bias, targets)
    expected_grads = torch.autograd.grad((expected_log_probs * upstream).sum(), leaves)

    torch.testing.assert_close(log_probs, expected_log_probs.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(is_top1, expected_top1)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert not entropy.requires_grad and not is_top1.requires_grad


def test_kernel_top1_takes_the_first_maximum_on_ties():
    """As `argmax` (and TRL) count it: with every logit equal, only target 0 is top-1."""
    hidden = torch.randn(4, 8)
    weight = torch.zeros(10, 8)
    log_probs, _, is_top1 = TiledLogProbs.apply(hidden, weight, None, torch.tensor([0, 3, 0, 9]), 3)
    assert is_top1.tolist() == [True, False, True, False]
    torch.testing.assert_close(log_probs, torch.full((4,), -torch.log(torch.tensor(10.0)).item()))


def test_kernel_under_bfloat16_autocast_is_close_to_float32():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(33, 32, generator=generator)
    weight = torch.randn(257, 32, generator=generator) * 0.1
    targets = torch.randint(0, 257, (33,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, _, _ = TiledLogProbs.apply(hidden, weight, None, targets, 8)
    expected, _, _ = _full_logits_reference(hidden, weight, None, targets)
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs, expected, rtol=0.02, atol=0.05)


def test_tokens_per_tile_fits_the_budget():
    assert tokens_per_tile(152_064) == 128 * 2**20 // (4 * 152_064)
    assert tokens_per_tile(10**9) == 16


def _fused_pair(make_model):
    """The same tiny model twice with TRL's fused LM head, the second also given the tiled kernel."""
    trl_model = make_model()
    add_fused_lm_head(trl_model, outputs=TRL_OUTPUTS)
    tiled_model = copy.deepcopy(trl_model)
    assert add_tiled_lm_head(tiled_model, always=True)
    return trl_model, tiled_model


@pytest.mark.parametrize("pre_shifted", [False, True])
def test_tiled_forward_equals_trls_fused_forward(make_model, pre_shifted):
    """Loss, per-token outputs and every parameter's gradient, through the model's forward."""
    trl_model, tiled_model = _fused_pair(make_model)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, trl_model.config.vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    label_args = {"shift_labels": F.pad(labels[:, 1:], (0, 1), value=-100)} if pre_shifted else {"labels": labels}
    outputs = {}
    for name, model in (("trl", trl_model), ("tiled", tiled_model)):
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True, num_items_in_batch=17, **label_args
        )
        out.loss.backward()
        outputs[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (trl_out, trl_grads), (tiled_out, tiled_grads) = outputs["trl"], outputs["tiled"]
    torch.testing.assert_close(tiled_out.loss, trl_out.loss, rtol=1e-5, atol=1e-6)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(tiled_out, field), getattr(trl_out, field), rtol=1e-5, atol=1e-5)
    assert torch.equal(tiled_out.is_top1, trl_out.is_top1)
    assert torch.equal(tiled_out.label_mask, trl_out.label_mask)
    assert trl_grads.keys() == tiled_grads.keys()
    for name, grad in trl_grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_without_labels_gives_a_zero_loss_that_backpropagates(make_model):
    _, tiled_model = _fused_pair(make_model)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    out = tiled_model(input_ids=input_ids, labels=torch.full_like(input_ids, -100), fused_lm_head=True)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert not out.label_mask.any() and not out.is_top1.any()
    assert tiled_model.get_output_embeddings().weight.grad.abs().sum() == 0


def test_calls_without_the_fused_head_are_the_models_own(make_model):
    trl_model, tiled_model = _fused_pair(make_model)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = trl_model(input_ids=input_ids, labels=input_ids)
        got = tiled_model(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_transformed_lm_heads_stay_with_trl(make_model, tmp_path, tokenizer, examples):
    model = make_model()
    model.config.final_logit_softcapping = 30.0
    assert not supports_tiled_lm_head(model)
    add_fused_lm_head(model, outputs=TRL_OUTPUTS)
    trl_forward = model.forward
    assert not add_tiled_lm_head(model)
    assert model.forward == trl_forward
    with pytest.raises(ValueError, match="lm_head_kernel='tiled'"):
        make_trainer(tmp_path, model, tokenizer, examples, lm_head_kernel="tiled")


def test_lm_head_kernel_is_validated(tmp_path):
    with pytest.raises(ValueError, match="lm_head_kernel"):
        make_config(tmp_path, lm_head_kernel="fast")


@pytest.mark.parametrize("lm_head_kernel", ["trl", "tiled"])
def test_trainer_uses_the_kernel_it_is_given(tmp_path, make_model, tokenizer, examples, lm_head_kernel, monkeypatch):
    """`trl` never calls the tiled kernel; `tiled` (and `auto` on this CPU) always does, for the LM term."""
    calls = []
    apply = TiledLogProbs.apply
    monkeypatch.setattr(TiledLogProbs, "apply", lambda *args: calls.append(1) or apply(*args))
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples, lm_head_kernel=lm_head_kernel)
    with torch.no_grad():
        trainer.compute_loss(model, dict(first_batch(trainer)))
    assert len(calls) == (lm_head_kernel == "tiled")
