"""The reasoning-family recipes: the paper's settings, offline sizes from the published configs, MXFP4 dequantised."""

from __future__ import annotations

import pytest

from safekey_trl.plan import plan_training
from safekey_trl.sft import parse_recipe


@pytest.mark.parametrize(
    "name,model,params",
    [
        # The published size: Qwen3-8B 8.19B parameters
        ("qwen3-8b", "Qwen/Qwen3-8B", 8_190_735_360),
        ("qwen3-8b-qlora", "Qwen/Qwen3-8B", 8_190_735_360),
        ("gpt-oss-20b-lora", "openai/gpt-oss-20b", None),
    ],
)
def test_family_recipes_have_the_paper_settings_and_plan_offline(name, model, params):
    script_args, args, model_args = parse_recipe(name, ["--use_cpu", "true"])
    assert model_args.model_name_or_path == model and script_args.chat_format == "auto"
    assert (args.num_train_epochs, args.auxiliary_epochs) == (5, 2)
    assert (args.qmm_weight, args.head_weight, args.head_theta) == (0.2, 0.2, 0.5)
    assert (args.max_length, args.bf16, args.gradient_checkpointing, args.seed) == (8192, True, True, 2002)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.warmup_steps) == (0.9, 0.95, 1e-4, 0.05)
    processes = 1 if model_args.use_peft else 8
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * processes == 128
    assert args.learning_rate == (1e-4 if model_args.use_peft else 1e-5)
    if params is not None:  # gpt-oss's MoE shape is not in the offline table: its plan needs the Hub config
        plan = plan_training(args, model_args)  # HF_HUB_OFFLINE: from the published-config table
        assert plan.total_params == params


def test_gpt_oss_recipe_loads_mxfp4_dequantised(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

    from safekey_trl import modeling

    script_args, args, model_args = parse_recipe("gpt-oss-20b-lora", ["--use_cpu", "true"])
    assert script_args.dequantize_mxfp4 and model_args.attn_implementation == "eager"
    calls = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda name, **kwargs: calls.setdefault("m", kwargs))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kwargs: None)
    modeling.load_model_and_tokenizer(model_args, dequantize_mxfp4=script_args.dequantize_mxfp4)
    config = calls["m"]["quantization_config"]
    assert isinstance(config, Mxfp4Config) and config.dequantize
    assert calls["m"]["dtype"] is __import__("torch").bfloat16 and calls["m"]["device_map"] is None
    model_args.load_in_4bit = True
    with pytest.raises(ValueError, match="cannot go with `load_in_4bit`"):
        modeling.load_model_and_tokenizer(model_args, dequantize_mxfp4=True)
