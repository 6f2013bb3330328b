"""LoRA and QLoRA: what trains, resume, export with and without merge, the attention choice, the dry-run plan."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from helpers import make_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen2Config
from trl import ModelConfig
from typer.testing import CliRunner

from safekey_trl import DualPathSafetyHead, SafeKeySFTTrainer
from safekey_trl.cli import app
from safekey_trl.export import export
from safekey_trl.heads import HEAD_WEIGHTS_NAME
from safekey_trl.modeling import load_model_and_tokenizer, lora_config, lora_targets, resolve_attn_implementation
from safekey_trl.plan import plan_training


@pytest.fixture(autouse=True)
def _tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SAFEKEY_TRL_CACHE", str(tmp_path_factory.getbasetemp() / "tiny-cache"))


def model_args(**overrides) -> ModelConfig:
    settings = dict(
        model_name_or_path="tiny:qwen2",
        dtype="float32",
        attn_implementation="sdpa",
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
    )
    settings.update(overrides)
    return ModelConfig(**settings)


def lora_trainer(output_dir, examples, quantized: bool = False, **config):
    args = model_args(load_in_4bit=quantized, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    model, tokenizer = load_model_and_tokenizer(args)
    config = {"learning_rate": 1e-2, "num_train_epochs": 2, "auxiliary_epochs": 2, **config}
    return SafeKeySFTTrainer(
        model,
        make_config(output_dir, **config),
        train_dataset=examples,
        processing_class=tokenizer,
        peft_config=lora_config(args),
    )


def named(trainer, predicate) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if predicate(n)}


def test_qlora_trains_lora_and_head_and_leaves_the_4bit_base(tmp_path, examples):
    trainer = lora_trainer(tmp_path, examples, quantized=True, num_train_epochs=3)
    quantized = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 14  # 7 linear layers in each of the 2 blocks, all in nf4
    base_4bit = [m.weight.detach().clone() for m in quantized]
    embeddings = trainer._causal_lm().model.embed_tokens.weight.detach().clone()
    lora = named(trainer, lambda n: "lora_" in n)
    head = named(trainer, lambda n: "safekey_head" in n)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in trainer.safety_head.parameters())
    trainer.train()
    losses = [entry["lm_loss"] for entry in trainer.state.log_history if "lm_loss" in entry]
    assert losses[-1] < losses[0]
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in lora.items() if "lora_B" in n)
    assert all(not torch.equal(after[n], v) for n, v in head.items())
    assert all(torch.equal(m.weight, w) for m, w in zip(quantized, base_4bit, strict=True))
    assert torch.equal(trainer._causal_lm().model.embed_tokens.weight, embeddings)


def test_lora_checkpoint_holds_adapter_and_head_and_resumes_exactly(tmp_path, examples):
    settings = dict(save_strategy="steps", save_steps=2)
    full = lora_trainer(tmp_path / "full", examples, **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / HEAD_WEIGHTS_NAME).is_file()
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as weights:
        assert not any("safekey_head" in key for key in weights.keys())
    resumed = lora_trainer(tmp_path / "resumed", examples, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = named(full, lambda n: "lora_" in n or "safekey_head" in n)
    for name, value in named(resumed, lambda n: "lora_" in n or "safekey_head" in n).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def lora_run(tmp_path, examples):
    trainer = lora_trainer(tmp_path / "run", examples, num_train_epochs=1, auxiliary_epochs=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    trainer.model.eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits
    return tmp_path / "run", trainer, ids, logits


def test_export_adapter_alone(tmp_path, lora_run):
    run, trainer, ids, logits = lora_run
    out = export(run, tmp_path / "adapter")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapter_model.safetensors", HEAD_WEIGHTS_NAME]
    loaded = AutoModelForCausalLM.from_pretrained(str(out))  # base + adapter, through transformers' PEFT support
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)
    head = DualPathSafetyHead.from_pretrained(out)
    assert torch.equal(head.prefix_head.weight, trainer.safety_head.prefix_head.weight)


def test_export_merged_equals_the_adapter_model(tmp_path, lora_run):
    run, trainer, ids, logits = lora_run
    merged_dir = export(run, tmp_path / "merged", merge=True, dtype="float32")
    assert not (merged_dir / "adapter_config.json").exists()
    merged, info = AutoModelForCausalLM.from_pretrained(str(merged_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, logits, rtol=1e-4, atol=1e-4)
    bf16 = AutoModelForCausalLM.from_pretrained(str(export(run, tmp_path / "bf16", merge=True)))
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids).logits.float(), logits, rtol=0.05, atol=0.05)


def test_export_command_and_its_errors(tmp_path, lora_run):
    run, *_ = lora_run
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "cli"), "--merge", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / HEAD_WEIGHTS_NAME).is_file()
    result = runner.invoke(app, ["export", str(tmp_path / "cli"), "--out", str(tmp_path / "again"), "--merge"])
    assert result.exit_code == 2 and "no adapter to merge" in result.output
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no safekey_head.safetensors" in result.output


def test_attention_implementation_choice(monkeypatch):
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if not (flash_installed and torch.cuda.is_available()):
        assert resolve_attn_implementation("auto") == resolve_attn_implementation(None) == "sdpa"
        with pytest.raises(ValueError, match="flash_attention_2"):
            resolve_attn_implementation("flash_attention_2")
    assert resolve_attn_implementation("eager") == "eager"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real_find_spec(name)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_attn_implementation("auto") == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="a CUDA device"):
        resolve_attn_implementation("flash_attention_2")


def test_flash_attention_where_it_cannot_run_fails_at_start_up(tmp_path):
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attention runs here")
    result = CliRunner().invoke(
        app, ["train", "--recipe", "tiny", "--attn_implementation", "flash_attention_2", "--output_dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    # pip's build isolation breaks `pip install flash-attn`: the advice is what works
    assert "pip install flash-attn --no-build-isolation" in " ".join(result.output.split())
    assert "safekey-trl[flash]" not in result.output
    assert not any(tmp_path.iterdir())  # nothing started


def test_lora_targets_default_to_all_linear():
    assert lora_targets(model_args(lora_target_modules=None)) == "all-linear"
    assert lora_targets(model_args(lora_target_modules=["all-linear"])) == "all-linear"
    assert lora_targets(model_args(lora_target_modules=["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    assert lora_config(model_args(use_peft=False)) is None


@pytest.mark.parametrize("use_peft", [False, True])
def test_dry_run_counts_what_the_trainer_trains(tmp_path, examples, use_peft):
    args = model_args(use_peft=use_peft)
    plan = plan_training(make_config(tmp_path), args)
    model, tokenizer = load_model_and_tokenizer(args)
    trainer = SafeKeySFTTrainer(
        model, make_config(tmp_path), train_dataset=examples, processing_class=tokenizer, peft_config=lora_config(args)
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert plan.trainable_params == trainable
    assert plan.head_params == sum(p.numel() for p in trainer.safety_head.parameters())


def test_dry_run_of_a_7b_config(tmp_path):
    config_dir = tmp_path / "qwen7b"
    Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ).save_pretrained(config_dir)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--recipe",
            "qwen7b-qlora",
            "--dry-run",
            "--use_cpu",
            "true",
            "--model_name_or_path",
            str(config_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "7,615,616,512 total, 40,377,346 trainable" in result.output
    plan = plan_training(
        make_config(
            tmp_path, per_device_train_batch_size=1, max_length=8192, bf16=True, activation_checkpointing=True
        ),
        model_args(model_name_or_path=str(config_dir), load_in_4bit=True, lora_r=16, dtype="bfloat16"),
    )
    assert 6 < plan.total / 2**30 < 12
    assert json.loads((config_dir / "config.json").read_text())["hidden_size"] == 3584


def test_qlora_merge_computes_what_the_trained_model_computed(tmp_path, examples):
    """An adapter trained on the 4-bit base is merged into the dequantized 4-bit weights it learnt on top of: merged
    into the unquantized base, the logits would differ by the whole quantization error."""
    trainer = lora_trainer(tmp_path / "run", examples, quantized=True, num_train_epochs=1, auxiliary_epochs=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    trainer.model.eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 257]])
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        with trainer.model.disable_adapter():
            base = trainer.model(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(str(export(tmp_path / "run", tmp_path / "merged", True, "float32")))
    assert not any(isinstance(module, Linear4bit) for module in merged.modules())
    with torch.no_grad():
        difference = (merged(ids).logits - trained).abs().max().item()
    adapter_effect = (trained - base).abs().max().item()
    assert difference < 0.01 < 0.1 * adapter_effect
