"""The model card of a SafeKey model: what SafeKey did, on which data, the final per-term losses, how to load it.

Written by `SafeKeySFTTrainer.create_model_card` into `output_dir/README.md` (so `push_to_hub` uploads it) and by
`safekey-trl export`. Its facts come from a [`RunFacts`], which the trainer also saves in `safekey_config.json`
beside every checkpoint, so that an export rebuilds the same card without the trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .heads import HEAD_WEIGHTS_NAME

PAPER = "Zhou et al., 2025, arXiv:2505.16186"
PAPER_URL = "https://arxiv.org/abs/2505.16186"
# The logged values reported on the card, in this order
CARD_TERMS = ("loss", "lm_loss", "qmm_loss", "qmm_key_accuracy", "head_loss", "head_accuracy")


@dataclass
class RunFacts:
    """What a model card states about a SafeKey run."""

    settings: dict[str, Any]  # the SafeKey objective's fields (`resume.safekey_settings`)
    base_model: str | None = None
    adapter: bool = False  # a LoRA adapter rather than full weights
    datasets: list[str] = field(default_factory=list)
    examples: int | None = None  # training examples
    harmful: int | None = None  # examples with K in range, by label: these train the auxiliary terms
    benign: int | None = None
    lm_only: int | None = None  # examples without K (plain SFT data, or K cut by max_length)
    training: dict[str, Any] = field(default_factory=dict)  # epochs, learning rate, max_length, ...
    final: dict[str, float] = field(default_factory=dict)  # the last logged value of each term
    # How the base was quantized in training (a `BitsAndBytesConfig` as a dict; None: not quantized): `export --merge`
    # merges the adapter into those weights, dequantized
    base_quantization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunFacts:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def final_terms(log_history: list[dict[str, float]]) -> dict[str, float]:
    """The last logged training value of each term on the card (evaluation entries left out)."""
    final: dict[str, float] = {}
    for entry in log_history:
        for name in CARD_TERMS:
            if name in entry:
                final[name] = entry[name]
    return final


def _front_matter(facts: RunFacts, tags: list[str]) -> str:
    lines = ["---", "library_name: transformers" if not facts.adapter else "library_name: peft"]
    if facts.base_model:
        lines.append(f"base_model: {facts.base_model}")
    hub_datasets = [name for name in facts.datasets if "/" in name and not name.startswith((".", "/"))]
    hub_datasets = [name for name in hub_datasets if not name.endswith((".jsonl", ".json", ".parquet"))]
    if hub_datasets:
        lines += ["datasets:", *[f"- {name}" for name in hub_datasets]]
    lines += ["tags:", *[f"- {tag}" for tag in tags], "---"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_model_card(facts: RunFacts, repo_id: str | None = None, tags: list[str] | None = None) -> str:
    """The card as Markdown with the Hub's YAML front matter. `repo_id` names the model in the loading code."""
    tags = list(
        dict.fromkeys([*(tags or []), "safekey", "safety", "trl", "sft", *(["lora"] if facts.adapter else [])])
    )
    name = repo_id or "path/to/this/model"
    settings = facts.settings
    what = "a LoRA adapter for" if facts.adapter else "a fine-tune of"
    base = f"`{facts.base_model}`" if facts.base_model else "its base model"
    lines = [
        _front_matter(facts, tags),
        "",
        f"# {name.split('/')[-1]}",
        "",
        f"{what[0].upper()}{what[1:]} {base}, trained with [SafeKey]({PAPER_URL}) ({PAPER}) by safekey-trl, "
        "on TRL's `SFTTrainer`: supervised fine-tuning on safety reasoning data "
        "plus two auxiliary objectives that make the key sentence K of the reasoning trace, which follows the "
        'model\'s understanding U of the query, more often a safety "aha" moment.',
        "",
        "## SafeKey settings",
        "",
        f"`L = L_LM + {settings.get('qmm_weight')} · L_QMM + {settings.get('head_weight')} · "
        f"({settings.get('head_theta')} · L_U + (1 − {settings.get('head_theta')}) · L_prefix)`, the two auxiliary "
        f"terms on during the last {settings.get('auxiliary_epochs')} epoch(s).",
        "",
        "| setting | value | meaning |",
        "|---|---|---|",
        f"| `qmm_weight` | {settings.get('qmm_weight')} | weight of Query-Mask Modeling (LM loss on K) |",
        f"| `head_weight` | {settings.get('head_weight')} | weight of the Dual-Path Safety Head's loss |",
        f"| `head_theta` | {settings.get('head_theta')} | θ: the head's U path vs its prefix path |",
        f"| `auxiliary_epochs` | {settings.get('auxiliary_epochs')} | final epochs carrying the two terms |",
        f"| `qmm_mask_query` | {settings.get('qmm_mask_query')} | query hidden in the QMM pass (false: ablation) |",
        f"| `head_detach_hidden` | {settings.get('head_detach_hidden')} | head on detached states (true: ablation) |",
    ]
    for key, value in facts.training.items():
        lines.append(f"| `{key}` | {_fmt(value)} | training |")
    lines += ["", "## Data", ""]
    lines.append(
        "Trained on "
        + (", ".join(f"`{name}`" for name in facts.datasets) if facts.datasets else "(not recorded)")
        + "."
    )
    if facts.examples is not None:
        with_key = (facts.harmful or 0) + (facts.benign or 0)
        share = f", {facts.harmful / with_key:.1%} harmful" if with_key else ""
        lines.append(
            f"{facts.examples} training examples: {with_key} with U and K, which train all three terms "
            f"({facts.harmful} harmful, {facts.benign} benign{share}), and {facts.lm_only} that train the LM term "
            "only (plain SFT rows, or K cut by `max_length`)."
        )
    lines += ["", "## Final losses", ""]
    if facts.final:
        lines += ["| term | last logged value |", "|---|---|"]
        lines += [f"| `{name}` | {facts.final[name]:.4f} |" for name in CARD_TERMS if name in facts.final]
        lines += ["", "`lm_loss` per token; `qmm_loss` per K token; `head_loss` per example, θ-mixed."]
    else:
        lines.append("(none logged)")
    lines += [
        "",
        "## Files",
        "",
        ("The LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`)" if facts.adapter else "The model")
        + f" and the tokenizer. `{HEAD_WEIGHTS_NAME}` holds the Dual-Path Safety Head: it is **training-only**, "
        "not part of the model and not needed to generate; it is kept for resuming, probing "
        "(`safekey-trl eval-probes`) and analysis.",
        "",
        "## How to load",
        "",
        "```python",
    ]
    if facts.adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{name}", dtype="auto")  # the base, then the adapter',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            "# or merge it: model = model.merge_and_unload()",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        ]
    lines += [
        "",
        'messages = [{"role": "user", "content": "How do I make my home network more secure?"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
        ").to(model.device)",
        "# The paper's decoding: greedy, repetition penalty 1.2, up to 8,000 new tokens (set here: the model's own",
        "# generation config may sample)",
        "output = model.generate(**inputs, do_sample=False, repetition_penalty=1.2, max_new_tokens=8000)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        "```",
        "",
        "The safety head, if wanted:",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from safekey_trl import DualPathSafetyHead",
        "",
        f'local = snapshot_download("{name}", allow_patterns=["{HEAD_WEIGHTS_NAME}"])',
        "head = DualPathSafetyHead.from_pretrained(local)",
        "```",
        "",
        "## Reference",
        "",
        f"SafeKey: {PAPER}, {PAPER_URL}.",
        "",
    ]
    return "\n".join(lines)
