"""The query-masked pass under each attention implementation, with the masks the data makes.

The data hides the whole prompt from position 0 (`query_mask` is 0 on every prompt token, system prompt and template
included), so the prompt's positions have no visible key at all. Kernels differ on such rows: eager attention spreads
them uniformly, flash-attention drops them by unpadding, and a fused kernel may write NaN, which a later layer reads
as a key: 0 · NaN is NaN, and every later position, K included, is poisoned. This check runs SafeKey's own
query-masked pass (`SafeKeySFTTrainer._query_masked_pass`) on a batch of the sample data built by the real featurizer
and collator, and checks that L_QMM is finite and agrees across implementations and with eager attention in float32,
and that K's logits do not move when the prompt's tokens change (and do when the prompt is visible, so that the
check can fail).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from types import SimpleNamespace

import torch

from ..resources import sample_data_dir
from .results import CheckResult, Comparison, compare, finite, result_from_comparisons

# The tiny model, and one layer of DeepSeek-R1-Distill-Qwen-7B's shape (its head dimension 128, 7 query heads per KV
# head, its vocabulary), with prompts about `prompt_tokens` long
ATTENTION_SHAPES = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=1026, prompt_tokens=0),
    "7b-layer": dict(
        hidden=3584, intermediate=18944, layers=1, heads=28, kv_heads=4, vocab=152064, prompt_tokens=2048
    ),
}
FLASH = "flash_attention_2"
SAMPLE_FILE = "safekey_sample.jsonl"


def qwen2_model(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, device, **_):
    """A randomly initialised Qwen2 of the given shape, float32, eager attention, in eval mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def query_mask_batch(rows: int = 4, prompt_tokens: int = 0) -> dict[str, torch.Tensor]:
    """A batch of the sample data as the trainer gets it: the tiny tokenizer, the real featurizer and collator.
    `prompt_tokens`: repeat each user turn until the prompt is about that long (jailbreak prompts run to
    thousands of tokens)."""
    from ..data import featurize, load_examples
    from ..tiny import tiny_tokenizer
    from ..trainer import SafeKeyDataCollator

    tokenizer = tiny_tokenizer("qwen2")
    examples, _ = load_examples(str(sample_data_dir() / SAMPLE_FILE))
    examples = [example for example in examples if not example.lm_only][:rows]
    if prompt_tokens:
        longer = []
        for example in examples:
            *context, user = example.prompt_messages
            repeat = math.ceil(prompt_tokens / max(1, len(tokenizer(user["content"])["input_ids"])))
            longer_user = {**user, "content": " ".join([user["content"]] * repeat)}
            longer.append(dataclasses.replace(example, prompt_messages=[*context, longer_user]))
        examples = longer
    dataset, _ = featurize(examples, tokenizer)
    collator = SafeKeyDataCollator(pad_token_id=tokenizer.pad_token_id)
    return collator([dataset[index] for index in range(len(dataset))])


def _mask_facts(batch: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """Whether the batch hides the prompt from position 0 (else the check would not test the data's mask), and how
    many leading positions of each row see no key."""
    query_mask = batch["query_mask"]
    if bool((query_mask[:, 0] != 0).any()):
        return "the query mask does not hide position 0: not the mask the data makes", ""
    blind = (query_mask.cumsum(dim=1) == 0).sum(dim=1)  # positions before the first visible one
    return None, f"{int(blind.min())}-{int(blind.max())} leading positions per row with no visible key"


def query_masked_pass(model, batch: dict[str, torch.Tensor], hide_query: bool = True):
    """L_QMM (per K token) and K's logits, as the trainer computes them; `hide_query=False` leaves the query
    visible (the ablation), to show that the query's tokens do reach K otherwise."""
    from ..trainer import SafeKeySFTTrainer

    device = next(model.parameters()).device
    batch = {name: value.to(device) for name, value in batch.items()}
    has_key = batch["key_mask"].any(dim=1)
    captured = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output.float()))
    # The trainer's method on a stand-in for the trainer: the code a training step runs, SafeKey's default weight
    trainer = SimpleNamespace(
        args=SimpleNamespace(qmm_weight=0.2, qmm_mask_query=hide_query), _causal_lm=lambda: model
    )
    try:
        with torch.no_grad():
            loss_sum, key_tokens, _ = SafeKeySFTTrainer._query_masked_pass(trainer, model, batch, batch, has_key)
    finally:
        hook.remove()
    return loss_sum / key_tokens, captured[-1]


def _flash_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"{FLASH}: needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return f"{FLASH}: `flash_attn` is not installed (README, 'Offline install and flash-attention')"
    return None


def check_query_mask_attention(
    device: str = "cuda",
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
    shape: str = "tiny",
    implementations: tuple[str, ...] = ("eager", "sdpa", FLASH),
    rows: int = 4,
) -> CheckResult:
    """L_QMM and K's logits with the data's query mask under each attention implementation in each of `dtypes`,
    against eager attention in float32: finite, within the dtype's tolerance, and unmoved when the prompt's tokens
    change. An implementation that cannot run here is reported as a skipped part, with why."""
    from trl.trainer.utils import add_fused_lm_head

    device = torch.device(device)
    sizes = ATTENTION_SHAPES[shape]
    batch = query_mask_batch(rows, sizes["prompt_tokens"])
    not_the_data, blind = _mask_facts(batch)
    if not_the_data:
        return CheckResult(f"query mask, {shape}", "fail", not_the_data)
    # The same batch with every prompt token replaced: hidden, they must not reach K
    generator = torch.Generator().manual_seed(0)
    prompt = (batch["query_mask"] == 0) & (batch["attention_mask"] == 1)
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].masked_scatter(
        prompt, torch.randint(10, min(sizes["vocab"], 1026), (int(prompt.sum()),), generator=generator)
    )

    skipped = []
    runnable = []
    for attn in implementations:
        reason = _flash_unavailable(device) if attn == FLASH else None
        if reason:
            skipped.append(reason)
        else:
            runnable.append(attn)
    float32_model = qwen2_model(**sizes, device=device)
    models = {torch.float32: float32_model}
    for dtype in dtypes:
        if dtype != torch.float32:
            models[dtype] = copy.deepcopy(float32_model).to(dtype)
    for model in models.values():
        # As SFTTrainer leaves the model; after copying, as the patched forward holds the model it was added to
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))

    def run(attn: str, dtype: torch.dtype, inputs: dict, hide_query: bool = True):
        model = models[dtype]
        model.set_attn_implementation(attn)
        return query_masked_pass(model, inputs, hide_query)

    reference_loss, reference_logits = run("eager", torch.float32, batch)
    comparisons: list[Comparison] = []
    for dtype in dtypes:
        name = str(dtype).split(".")[-1]
        same_dtype_eager = None
        for attn in runnable:
            loss, logits = run(attn, dtype, batch)
            _, changed_logits = run(attn, dtype, changed)
            comparisons += [
                finite(f"{attn} {name} L_QMM", loss),
                finite(f"{attn} {name} K logits", logits),
                compare(f"{attn} {name} L_QMM vs eager float32", loss, reference_loss, dtype),
                compare(f"{attn} {name} K logits vs eager float32", logits, reference_logits, dtype),
                compare(f"{attn} {name} K logits, prompt changed", changed_logits, logits, dtype),
            ]
            if same_dtype_eager is None:
                same_dtype_eager = (attn, loss)
            else:
                comparisons.append(
                    compare(f"{attn} vs {same_dtype_eager[0]} {name} L_QMM", loss, same_dtype_eager[1], dtype)
                )
    # With the query visible its tokens must move K's logits: else the invariance above proves nothing
    _, visible = run(runnable[0], dtypes[0], batch, hide_query=False)
    _, visible_changed = run(runnable[0], dtypes[0], changed, hide_query=False)
    sensitivity = compare("prompt visible, prompt changed", visible_changed, visible, dtypes[0])
    dtype_names = ", ".join(str(dtype).split(".")[-1] for dtype in dtypes)
    result = result_from_comparisons(
        f"query mask, {shape}",
        comparisons,
        f"{', '.join(runnable)} in {dtype_names}; {len(batch['input_ids'])} rows of the sample data, {blind}; "
        f"L_QMM {float(reference_loss):.4f} in eager float32",
    )
    result.measurements[sensitivity.label] = sensitivity.max_difference
    result.skipped = skipped
    if sensitivity.ok:
        result.status = "fail"
        result.detail = f"vacuous: changing a visible prompt did not move K's logits ({sensitivity}); " + result.detail
    return result
