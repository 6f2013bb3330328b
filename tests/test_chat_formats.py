"""Each reasoning family's rendering: TRL's real templates, a tokenizer with the family's special tokens, hand-written
expected turns, the inference prompt byte for byte, the boundary rule, and the errors."""

from __future__ import annotations

import functools
import re
from datetime import datetime

import pytest
from conftest import ROOT, make_example
from helpers import check_boundary_rule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safekey_trl.data import SafeKeyDataError, SafeKeyExample, featurize_example, load_examples, render
from safekey_trl.data.chat_formats import (
    CHAT_FORMATS,
    TEMPLATE_DATE,
    ChatFormatError,
    known_templates,
    resolve_chat_format,
    trl_chat_templates,
)
from safekey_trl.tiny import QWEN2_SPLIT_PATTERN, build_tiny_tokenizer

# Every TRL template of a family, with the family: the recognised set
TEMPLATES = {stem: format.name for format in CHAT_FORMATS.values() for stem in format.templates}
BASE_TEMPLATES = sorted(stem for stem in TEMPLATES if not stem.endswith("_training"))
# One template per distinct layout, for the slower property test
LAYOUTS = [
    "deepseek_r1_distill",
    "phi4_reasoning",
    "olmo3_think",
    "deepseekv3",
    "qwen3",
    "qwen3_8",
    "gptoss",
    "glm4moe",
    "nemotron_3_nano",
    "nemotron_3_ultra",
    "gemma4",
    "gemma4_v5",
]

# The assistant turn each template must end the example with, written out by hand from the models' formats
R1_TURN = "<think>\n{trace}\n</think>\n\n{answer}<｜end▁of▁sentence｜>"
QWEN3_TURN = "<|im_start|>assistant\n<think>\n{trace}\n</think>\n\n{answer}<|im_end|>\n"
GPT_OSS_TURN = (
    "<|start|>assistant<|channel|>analysis<|message|>{trace}<|end|>"
    "<|start|>assistant<|channel|>final<|message|>{answer}<|return|>"
)
NEMOTRON_TURN = "<|im_start|>assistant\n<think>\n{trace}\n</think>\n{answer}<|im_end|>\n"
NEMOTRON_TIGHT_TURN = "<|im_start|>assistant\n<think>\n{trace}</think>{answer}<|im_end|>\n"
GLM_TURN = "<|assistant|>\n<think>{trace}</think>\n{answer}<|user|>"
GEMMA4_TURN = "<|turn>model\n<|channel>thought\n{trace}\n<channel|>{answer}<turn|>\n"
PHI4_TURN = "<|im_start|>assistant<|im_sep|><think>\n{trace}\n</think>\n\n{answer}<|im_end|>"
OLMO3_TURN = "<|im_start|>assistant\n<think>\n{trace}\n</think>\n\n{answer}<|im_end|>"
EXPECTED_TURN = {
    "phi4_reasoning": PHI4_TURN,
    "olmo3_think": OLMO3_TURN,
    "r1_distill": R1_TURN,
    "deepseek_v3": R1_TURN,
    "qwen3": QWEN3_TURN,
    "gpt_oss": GPT_OSS_TURN,
    "glm4_moe": GLM_TURN,
    "gemma4": GEMMA4_TURN,
}


def expected_turn(stem: str) -> str:
    if stem.startswith(("nemotron_3_ultra", "nemotron_3_5")):
        return NEMOTRON_TIGHT_TURN
    if stem.startswith("nemotron_3"):
        return NEMOTRON_TURN
    return EXPECTED_TURN[TEMPLATES[stem]]


@functools.cache
def family_tokenizer(stem: str):
    return build_tiny_tokenizer(known_templates()[stem], family=TEMPLATES[stem])


UNDERSTANDING = "Okay, so the user is asking how to make a dangerous thing at home."
KEY = " But wait, this could be used to hurt someone."
REST = " I should refuse."
ANSWER = "I can't help with that."
TRACE = UNDERSTANDING + KEY + REST


def inference_prompt(tokenizer, messages) -> str:
    """The prompt as the template renders it at inference, thinking on, today's date read back as the pinned one."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    return prompt.replace(datetime.now().strftime("%Y-%m-%d"), TEMPLATE_DATE.strftime("%Y-%m-%d"))


@pytest.mark.parametrize("stem", sorted(TEMPLATES))
def test_every_template_renders_the_family_turn_after_the_inference_prompt(stem):
    tokenizer = family_tokenizer(stem)
    example = make_example(understanding=UNDERSTANDING, key=KEY, rest=REST, answer=ANSWER)
    rendered = render(example, tokenizer)
    prompt = inference_prompt(tokenizer, example.prompt_messages)
    # The prompt part is the inference rendering, byte for byte
    assert rendered.text[: rendered.prompt_end] == prompt
    # The whole example is the prompt then the family's turn (less what the generation prompt already opened)
    turn = expected_turn(stem).replace("{trace}", TRACE).replace("{answer}", ANSWER)
    overlap = next(k for k in range(len(turn), -1, -1) if prompt.endswith(turn[:k]))
    assert rendered.text == prompt + turn[overlap:]
    # U and K map onto their own text
    u_start = rendered.text.index(UNDERSTANDING, rendered.prompt_end)
    assert rendered.understanding_end == u_start + len(UNDERSTANDING)
    assert rendered.text[rendered.understanding_end : rendered.key_end] == KEY


# Templates that drop a final turn's reasoning get the family's turn appended: the test above covers them
RENDERING_TEMPLATES = sorted(stem for stem in TEMPLATES if CHAT_FORMATS[TEMPLATES[stem]].templates[stem] != "append")


@pytest.mark.parametrize("stem", RENDERING_TEMPLATES)
def test_the_example_is_the_templates_own_rendering_of_the_conversation(stem):
    """Where a template renders a final turn's reasoning (TRL's training variant, or gemma4_v5 itself), the example
    is exactly its rendering of the conversation with the reasoning where it reads it."""
    mode = CHAT_FORMATS[TEMPLATES[stem]].templates[stem]
    tokenizer = family_tokenizer(stem)
    example = make_example(understanding=UNDERSTANDING, key=KEY, rest=REST, answer=ANSWER)
    template = known_templates()[stem if mode == "self" else f"{stem}_training"]
    field = CHAT_FORMATS[TEMPLATES[stem]].reasoning_field
    message = (
        {"role": "assistant", "content": ANSWER, field: TRACE}
        if field
        else {
            "role": "assistant",
            "content": example.response,
        }
    )
    conversation = tokenizer.apply_chat_template(
        [*example.prompt_messages, message], chat_template=template, tokenize=False, enable_thinking=True
    )
    conversation = conversation.replace(datetime.now().strftime("%Y-%m-%d"), TEMPLATE_DATE.strftime("%Y-%m-%d"))
    assert render(example, tokenizer).text == conversation


def test_r1_rendering_is_unchanged(tokenizer, examples):
    """R1-Distill: the prompt with its generation prompt, the response less the `<think>\\n` it opens, then EOS."""
    for example in examples:
        prompt = tokenizer.apply_chat_template(example.prompt_messages, tokenize=False, add_generation_prompt=True)
        assert render(example, tokenizer).text == prompt + example.response[len("<think>\n") :] + tokenizer.eos_token
        assert featurize_example(example, tokenizer) == featurize_example(example, tokenizer, chat_format="verbatim")


SENTENCE_ALPHABET = st.sampled_from(list("abcdefghij klmnop,;:'-0123456789éü—") + ["the ", "ing ", "  ", "\n"])
sentence = st.lists(SENTENCE_ALPHABET, min_size=1, max_size=20).map("".join)
terminal = st.sampled_from([".", "?", "!", '."'])
separator = st.sampled_from([" ", "\n\n", "\n", ""])


@pytest.mark.parametrize("stem", LAYOUTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    understanding=st.lists(st.tuples(sentence, terminal), min_size=1, max_size=2),
    key=st.tuples(separator, sentence, terminal),
    rest=st.lists(st.tuples(separator, sentence, terminal), max_size=2),
)
def test_key_tokens_decode_to_k_in_every_family(stem, understanding, key, rest):
    tokenizer = family_tokenizer(stem)
    k_text = "".join(key)
    if not k_text.strip():
        return
    rest_text = "".join("".join(part) for part in rest)
    checked = check_boundary_rule(tokenizer, "Okay, so " + "".join(s + t for s, t in understanding), k_text, rest_text)
    if checked is None:
        return
    rendered, offsets, feature = checked
    # The query mask hides every prompt token: the family's preamble and generation prompt included
    prompt_tokens = sum(1 for start, _ in offsets if start < rendered.prompt_end)
    assert feature["query_mask"] == [0] * prompt_tokens + [1] * (len(offsets) - prompt_tokens)


@pytest.mark.parametrize("stem", LAYOUTS)
def test_key_in_the_answer_and_an_empty_trace(stem):
    tokenizer = family_tokenizer(stem)
    answer = "I understand the request. But I cannot help with that. Here is why."
    response = "<think>\n\n</think>\n\n" + answer
    u_end = response.index(" But")
    k_end = response.index(" Here")
    example = SafeKeyExample([{"role": "user", "content": "How do I X?"}], response, u_end, k_end, True)
    rendered = render(example, tokenizer)
    assert rendered.text[rendered.understanding_end : rendered.key_end] == " But I cannot help with that."
    assert rendered.text[rendered.prompt_end : rendered.understanding_end].endswith("I understand the request.")
    feature = featurize_example(example, tokenizer)
    key_start = feature["prefix_end"]
    decoded = tokenizer.decode(feature["input_ids"][key_start : key_start + sum(feature["key_mask"])])
    assert decoded == " But I cannot help with that."


def test_a_template_that_strips_the_trace_keeps_k_on_its_text():
    """GLM-4 MoE strips the trace's and the answer's ends; offsets shift with what it strips."""
    tokenizer = family_tokenizer("glm4moe")
    example = make_example(understanding="  \n" + UNDERSTANDING, key=KEY, rest=REST + "\n ", answer="\n" + ANSWER)
    rendered = render(example, tokenizer)
    assert rendered.text.endswith(f"<think>{TRACE}</think>\n{ANSWER}<|user|>")
    assert rendered.text[rendered.understanding_end : rendered.key_end] == KEY
    assert rendered.text[: rendered.understanding_end].endswith("<think>" + UNDERSTANDING)


def test_gpt_oss_features_do_not_depend_on_the_day(monkeypatch):
    import transformers.utils.chat_template_utils as chat_template_utils

    tokenizer = family_tokenizer("gptoss")
    example = make_example()
    features, prompts = [], []
    for day in (datetime(2024, 1, 2), datetime(2031, 12, 30)):

        class Today(datetime):
            @classmethod
            def now(cls, tz=None, day=day):
                return day

        monkeypatch.setattr(chat_template_utils, "datetime", Today)
        prompts.append(tokenizer.apply_chat_template(example.prompt_messages, tokenize=False))
        features.append(featurize_example(example, tokenizer))
    assert prompts[0] != prompts[1]  # the template does read today's date
    assert features[0] == features[1]
    assert f"Current date: {TEMPLATE_DATE:%Y-%m-%d}" in tokenizer.decode(features[0]["input_ids"])


def test_an_unknown_template_is_an_error_naming_it_unless_named_or_verbatim(examples):
    custom = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|bot|>{% endif %}"
    )
    tokenizer = build_tiny_tokenizer(custom)
    with pytest.raises(ChatFormatError, match=r"not one SafeKey recognises .*starting '\{% for m in messages"):
        featurize_example(examples[0], tokenizer)
    with pytest.raises(ChatFormatError, match="Unknown chat_format 'qwen4'"):
        resolve_chat_format(tokenizer, "qwen4")
    rendered = render(examples[0], tokenizer, "verbatim")
    assert rendered.text == f"<|user|>{examples[0].prompt_messages[0]['content']}<|bot|>{examples[0].response}" + (
        tokenizer.eos_token
    )


def test_a_named_family_renders_a_modified_template_of_it():
    # A local edit that changes what the template renders: a fixed preamble
    template = "{{- 'Local preamble.\\n' }}" + trl_chat_templates()["qwen3"]
    tokenizer = build_tiny_tokenizer(template, family="qwen3")
    example = make_example(understanding=UNDERSTANDING, key=KEY, rest=REST, answer=ANSWER)
    with pytest.raises(ChatFormatError, match="not one SafeKey recognises"):
        render(example, tokenizer)
    original = render(example, family_tokenizer("qwen3")).text
    assert render(example, tokenizer, "qwen3").text == "Local preamble.\n" + original
    with pytest.raises(ChatFormatError, match="chat template renders as 'gptoss', of the gpt_oss family"):
        render(example, family_tokenizer("gptoss"), "qwen3")


def test_a_template_whose_conversation_does_not_extend_its_prompt_is_an_error():
    # Named as Qwen3, but its generation prompt opens a turn the conversation's rendering does not have
    template = trl_chat_templates()["qwen3"].replace("'<|im_start|>assistant\\n' }}", "'<|im_start|>model\\n' }}", 1)
    assert template != trl_chat_templates()["qwen3"]
    tokenizer = build_tiny_tokenizer(template, family="qwen3")
    with pytest.raises(SafeKeyDataError, match="does not start with the prompt the template renders at inference"):
        render(make_example(), tokenizer, "qwen3")


def test_the_config_offers_every_format():
    from dataclasses import fields

    from safekey_trl.config import SafeKeyScriptArguments
    from safekey_trl.data.chat_formats import FORMAT_NAMES

    (chat_format,) = [f for f in fields(SafeKeyScriptArguments) if f.name == "chat_format"]
    assert tuple(chat_format.metadata["choices"]) == FORMAT_NAMES


def test_data_inspect_and_validate_render_in_the_chosen_family(tmp_path):
    from conftest import SAMPLE_DATA
    from typer.testing import CliRunner

    from safekey_trl.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "inspect", str(SAMPLE_DATA), "--row", "1", "--template", "gpt_oss"])
    assert result.exit_code == 0, result.output
    assert "in the gptoss format" in result.output
    assert "<|channel|>analysis<|message|>Okay, so the user" in result.output
    assert f"Current date: {TEMPLATE_DATE:%Y-%m-%d}" in result.output
    result = runner.invoke(app, ["data", "validate", str(SAMPLE_DATA), "--template", "glm4_moe"])
    assert result.exit_code == 0, result.output
    assert "rendered in the glm4moe format" in result.output and "every row is valid" in result.output
    custom = tmp_path / "custom.jinja"
    custom.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    result = runner.invoke(app, ["data", "validate", str(SAMPLE_DATA), "--template", str(custom)])
    assert result.exit_code == 2 and "not one SafeKey recognises" in result.output.replace("\n", "")


# ---------------------------------------------------------------------------------------------------------------------
# Recognition by what a template renders; declared turns; template variables; the inference prompt's tokens


def reformatted(template: str) -> str:
    """The same template laid out differently: wider tag delimiters and a comment, which render nothing."""
    wider = template.replace("{%- ", "{%-  ").replace(" %}", "  %}").replace("{{ ", "{{  ")
    return "{#- reformatted by hand #}" + wider


@pytest.mark.parametrize("stem", sorted(TEMPLATES))
def test_a_reformatted_copy_of_a_known_template_is_recognised_and_renders_the_same(stem):
    original = family_tokenizer(stem)
    copy = build_tiny_tokenizer(reformatted(known_templates()[stem]), family=TEMPLATES[stem])
    assert copy.chat_template != original.chat_template
    resolved = resolve_chat_format(copy)
    # DeepSeek-V3's template renders every probe as R1-Distill's does, and takes the same turn
    assert resolved.format.name == ("r1_distill" if stem.startswith("deepseekv3") else TEMPLATES[stem])
    example = make_example(understanding=UNDERSTANDING, key=KEY, rest=REST, answer=ANSWER)
    assert featurize_example(example, copy) == featurize_example(example, original)


def test_a_near_miss_is_named_with_the_first_characters_where_it_parts():
    # Qwen3 with one character changed in its generation prompt
    template = trl_chat_templates()["qwen3"].replace("'<|im_start|>assistant\\n' }}", "'<|im_start|>assistant \\n' }}")
    assert template != trl_chat_templates()["qwen3"]
    tokenizer = build_tiny_tokenizer(template, family="qwen3")
    with pytest.raises(ChatFormatError) as raised:
        resolve_chat_format(tokenizer)
    message = str(raised.value)
    assert "the closest is 'qwen3' (qwen3)" in message
    assert "a user turn, with the generation prompt parts from it at character" in message
    assert "'<|im_start|>assistant \\n'" in message.replace("\\\\n", "\\n") or "assistant \\n" in message


# Kimi-K2-Thinking's way with a final reasoning turn: `<think></think>` in place of its reasoning. A stand-in with that
# behaviour, not Kimi's template: ChatML-like turns, the generation prompt with no `<think>` of its own
DROPPING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}<think></think>{{ m.content }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_drops_the_final_turns_reasoning_says_so_and_what_to_do():
    tokenizer = build_tiny_tokenizer(DROPPING_TEMPLATE, family="qwen3")
    example = make_example(understanding=UNDERSTANDING, key=KEY, rest=REST, answer=ANSWER)
    with pytest.raises(SafeKeyDataError) as raised:
        render(example, tokenizer, "qwen3")  # named as a family that renders its turns through the template
    message = str(raised.value)
    assert "drops the reasoning of a conversation's final assistant turn" in message
    assert "renders that turn as '<think></think>{answer}<|im_end|>\\n'" in message
    assert "chat_format_turn" in message and "verbatim" in message


def test_a_declared_turn_renders_after_the_generation_prompt_with_exact_spans():
    tokenizer = build_tiny_tokenizer(DROPPING_TEMPLATE, family="qwen3")
    turn = "<think>{trace}</think>{answer}<|im_end|>\n"
    resolved = resolve_chat_format(tokenizer, turn=turn)
    example = make_example(understanding=UNDERSTANDING, key=KEY, rest=REST, answer=ANSWER)
    rendered = render(example, tokenizer, resolved)
    prompt = inference_prompt(tokenizer, example.prompt_messages)
    assert rendered.text == prompt + f"<think>{TRACE}</think>{ANSWER}<|im_end|>\n"
    assert rendered.text[rendered.understanding_end : rendered.key_end] == KEY
    feature = featurize_example(example, tokenizer, chat_format=resolved)
    key_start = feature["prefix_end"]
    assert tokenizer.decode(feature["input_ids"][key_start : key_start + sum(feature["key_mask"])]) == KEY


@pytest.mark.parametrize(
    ("turn", "message"),
    [
        ("<think>{answer}</think>{trace}<|im_end|>", "must hold {trace} once and then {answer} once"),
        ("<think>{trace}</think><|im_end|>", "must hold {trace} once and then {answer} once"),
        ("<think>{trace}</think>{answer}", "holds none of the tokenizer's special tokens"),
    ],
)
def test_a_declared_turn_that_breaks_the_rules_is_refused(turn, message):
    tokenizer = build_tiny_tokenizer(DROPPING_TEMPLATE, family="qwen3")
    with pytest.raises(ChatFormatError, match=re.escape(message)):
        resolve_chat_format(tokenizer, turn=turn)
    with pytest.raises(ChatFormatError, match="set one of them"):
        resolve_chat_format(tokenizer, "qwen3", turn="<think>{trace}</think>{answer}<|im_end|>")


def test_a_declared_turn_may_not_repeat_what_the_generation_prompt_opened():
    tokenizer = family_tokenizer("deepseek_r1_distill")  # its generation prompt ends `<think>\n`
    example = make_example()
    resolved = resolve_chat_format(tokenizer, turn="<think>{trace}</think>{answer}<｜end▁of▁sentence｜>")
    with pytest.raises(SafeKeyDataError, match="which the generation prompt already holds"):
        render(example, tokenizer, resolved)
    # Its exact tail is not repeated: the turn goes on from it
    resolved = resolve_chat_format(tokenizer, turn="<think>\n{trace}\n</think>\n\n{answer}<｜end▁of▁sentence｜>")
    assert render(example, tokenizer, resolved).text == render(example, tokenizer).text


def test_template_variables_reach_the_rendering():
    tokenizer = family_tokenizer("gptoss")
    example = make_example()
    high = resolve_chat_format(tokenizer, template_kwargs={"reasoning_effort": "high"})
    assert "Reasoning: high" in render(example, tokenizer, high).text
    assert "Reasoning: medium" in render(example, tokenizer).text


def test_the_carried_templates_are_the_published_ones():
    """OLMo-3-Think's copy is byte for byte the template whose sha256 was recorded for allenai/Olmo-3-7B-Think's
    chat_template.jinja (open-instruct's `olmo_thinker`); Phi-4-reasoning's opens with its fixed system prompt."""
    import hashlib

    olmo = known_templates()["olmo3_think"]
    assert hashlib.sha256(olmo.encode()).hexdigest() == (
        "6d549883b5ed12879e191845c256a30c7dfd4eced0a4f160060a3ea0199d9e3a"
    )
    phi = known_templates()["phi4_reasoning"]
    assert phi.startswith("<|im_start|>system<|im_sep|>You are Phi, a language model trained by Microsoft")
    assert phi.endswith("{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")


EMPTY_TRACE_ROWS = ROOT / "tests" / "fixtures" / "empty_trace_rows.json"


@pytest.mark.parametrize("stem", LAYOUTS)
def test_the_prompt_is_tokenized_as_at_inference_on_empty_trace_rows(stem):
    """With Qwen's pre-tokenizer a run of newlines is one token: R1's `<think>\\n` and an empty trace's `\\n` would
    merge into `\\n\\n` if the whole text were tokenized at once, a prompt inference never produces."""
    template, family = known_templates()[stem], TEMPLATES[stem]
    tokenizer = build_tiny_tokenizer(template, family=family, split_pattern=QWEN2_SPLIT_PATTERN)
    assert len(tokenizer("\n\n", add_special_tokens=False)["input_ids"]) == 1
    examples, _ = load_examples(str(EMPTY_TRACE_ROWS))
    for example in examples:
        feature = featurize_example(example, tokenizer)
        prompt_len = feature["understanding_span"][0]
        inference = tokenizer(inference_prompt(tokenizer, example.prompt_messages), add_special_tokens=False)
        assert feature["input_ids"][:prompt_len] == inference["input_ids"]
        assert feature["labels"][:prompt_len] == [-100] * prompt_len and feature["labels"][prompt_len] != -100
        key = example.response[example.summary_end_idx : example.next_sentence_end_idx]
        key_start = feature["prefix_end"]
        decoded = tokenizer.decode(feature["input_ids"][key_start : key_start + sum(feature["key_mask"])])
        assert decoded.strip() == key.strip()
