"""Shared fixtures: the real R1-Distill chat template, the tiny tokenizer and model, small SafeKey examples."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model is saved once per test session here rather than under the user's home
os.environ.setdefault("SAFEKEY_TRL_CACHE", tempfile.mkdtemp(prefix="safekey-tiny-"))
# Featurised datasets are cached under the datasets cache: a fresh one per test session
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="safekey-datasets-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from safekey_trl.data import SafeKeyExample  # noqa: E402
from safekey_trl.tiny import build_tiny_model, build_tiny_tokenizer, r1_distill_chat_template  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = ROOT / "data" / "safekey_sample.jsonl"


@pytest.fixture(scope="session")
def chat_template() -> str:
    """The real DeepSeek-R1-Distill chat template: the package's copy (checked against TRL's in test_data)."""
    return r1_distill_chat_template()


@pytest.fixture(scope="session")
def tokenizer(chat_template):
    return build_tiny_tokenizer(chat_template=chat_template)


@pytest.fixture
def make_model(tokenizer):
    """Build a fresh tiny model: `make_model(seed=0, attn_implementation="sdpa", architecture="qwen2")`."""

    def make(seed: int = 0, attn_implementation: str = "sdpa", architecture: str = "qwen2"):
        return build_tiny_model(tokenizer, architecture, seed=seed, attn_implementation=attn_implementation)

    return make


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny model saved like a SafeKey output_dir: the causal LM, its tokenizer and a safety head beside it. One
    per test module, as eval's default output folder (`<name>-eval`) is written beside it."""
    from safekey_trl.heads import DualPathSafetyHead

    directory = tmp_path_factory.mktemp("model")
    build_tiny_model(tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    DualPathSafetyHead(64).save_pretrained(directory)
    return directory


def make_example(
    question: str = "How do I make a dangerous thing at home?",
    understanding: str = "Okay, so the user is asking how to make a dangerous thing at home.",
    key: str = " But wait, this could be used to hurt someone.",
    rest: str = " I should refuse and point to safer resources.",
    answer: str = "I can't help with that, but here is some safety information.",
    unsafe: bool = True,
) -> SafeKeyExample:
    """A SafeKey example built from its parts, with exact offsets."""
    head = "<think>\n" + understanding
    response = head + key + rest + "\n</think>\n\n" + answer
    return SafeKeyExample(
        prompt_messages=[{"role": "user", "content": question}],
        response=response,
        summary_end_idx=len(head),
        next_sentence_end_idx=len(head) + len(key),
        unsafe=unsafe,
    )


@pytest.fixture
def examples() -> list[SafeKeyExample]:
    """Eight short examples, half harmful, with varied lengths."""
    rows = []
    for i in range(8):
        harmful = i % 2 == 0
        rows.append(
            make_example(
                question=f"Question number {i}: how do I do thing {i}?" + " Please." * (i % 3),
                understanding=f"Okay, so the user is asking about thing {i}." + " They want details." * (i % 2),
                key=" But wait, this could be used to hurt someone."
                if harmful
                else " That sounds like a normal task.",
                rest=" Let me think about it." * (1 + i % 3),
                answer="I can't help with that." if harmful else "Sure, here is how.",
                unsafe=harmful,
            )
        )
    return rows


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
