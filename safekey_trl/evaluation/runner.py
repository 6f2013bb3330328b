"""Running an evaluation: generate, judge or score, and append one row per rollout to a results file that resumes.

Results are appended to a JSONL file, one row per (suite, prompt id, sample), as each is judged. Every row says how it
was made: the sampling settings, the backend, the chat format, the prefill, the dataset and its revision, the judge,
its rubric and the rubric's hash, the judged part. Running again on the same file resumes: rollouts with a verdict are
skipped, rollouts whose judging failed (or that ran without a judge) are judged again from the stored response
without generating again. A rollout made (or judged) under other settings is not mixed in: resuming refuses, naming
what differs. When a rollout has several rows, the last one counts. Every number of a summary or report is counted
from these rows.

Capability rollouts are scored in the main thread (math-verify's timeouts need it); judges run in
`judge.max_workers` threads (or in whole batches for a batch judge) while the next batch generates.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..data.chat_formats import AUTO
from .generation import Completion, Generator, SamplingSettings
from .judges import Judge, Verdict
from .rendering import (
    PREFILL_SEPARATOR,
    RenderedPrompt,
    ResponseParts,
    TurnLayout,
    final_text,
    judged_text,
    render_prompt,
    split_response,
    turn_layout,
)
from .scoring import has_verdict, score_capability
from .suites import CAPABILITY, EvalPrompt

logger = logging.getLogger(__name__)

RowKey = tuple[str, str, int]
# How long Ctrl-C waits for judge requests already in flight before saving their rollouts unjudged
INTERRUPT_GRACE_SECONDS = 2.0


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_eval`: what the results file holds now (judged rollouts, and generated ones saved unjudged,
    which the same command judges without generating them again)."""

    def __init__(self, path: Path, judged: int, unjudged: int, total: int):
        self.path, self.judged, self.unjudged, self.total = path, judged, unjudged, total
        super().__init__(f"interrupted: {judged} of {total} rollouts judged")


def row_key(row: dict[str, Any]) -> RowKey:
    """What identifies a rollout in a results file (rows written before rollouts existed are sample 0)."""
    return row["suite"], str(row["id"]), int(row.get("sample") or 0)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results file, the last row of each rollout only, in first-seen order."""
    rows: dict[RowKey, dict[str, Any]] = {}
    with Path(path).open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[row_key(row)] = row
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: line {line_number} is not a result row (needs suite and id)") from None
    return list(rows.values())


class ResultsFile:
    """An append-only JSONL results file, safe to write from several judging threads, that resumes a run.

    A last line cut short by an interrupted write is dropped on opening, so that appending goes on from a whole row.
    Rows must all come from one model: resuming a file with another model's results is refused.
    """

    def __init__(self, path: str | Path, model: str):
        self.path, self.model = Path(path), model
        self.lock = threading.Lock()
        self.rows: dict[RowKey, dict[str, Any]] = {}
        if self.path.is_file():
            self._drop_partial_last_line()
            for row in read_results(self.path):
                if row.get("model") != model:
                    raise ValueError(
                        f"{self.path} holds results of model {row.get('model')!r}, not {model!r}: "
                        "give another --out (or --label)."
                    )
                self.rows[row_key(row)] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _drop_partial_last_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning("%s: dropping a partial last line (an interrupted write)", self.path)
            with self.path.open("r+b") as handle:
                handle.truncate(keep)

    def append(self, row: dict[str, Any]) -> None:
        """Write one row and flush it, so that an interruption loses at most the row being written."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self.lock:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
            self.rows[row_key(row)] = row


# What a row was generated under: a rollout made under other values is not resumed into the same file. Rollouts are
# draws, so the number of them asked for (`samples`) may change between runs; the backend is recorded, not compared
# (rows generated on a GPU may be judged later on a machine without vLLM; eval-report shows a file's backends).
GENERATION_SETTINGS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "chat_format",
    "chat_format_turn",
    "chat_template_kwargs",
    "prompt_format",
    "prefill",
    "prefill_separator",
    "dataset_revision",
    "preset",
)
# ... and what a verdict was given under
JUDGE_SETTINGS = ("judge", "judge_model", "judge_rubric", "judge_prompt_sha256", "judge_part")
UNKNOWN_WHEN_NONE = ("dataset_revision",)  # None: not known, not a different value


def differences(row: dict[str, Any], settings: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The settings among `keys` on which a stored row and a run differ (`name: stored -> now`); a setting the
    row does not record (written by an older version) is not a difference."""
    found = []
    for key in keys:
        if key not in row or key not in settings:
            continue
        old, new = row[key], settings[key]
        if key in UNKNOWN_WHEN_NONE and (old is None or new is None):
            continue
        if old != new:
            found.append(f"{key}: {old!r} -> {new!r}")
    return found


def _sampling_for(sampling: SamplingSettings | Mapping[str, SamplingSettings] | None, suite: str) -> SamplingSettings:
    if sampling is None:
        return SamplingSettings()
    if isinstance(sampling, SamplingSettings):
        return sampling
    return sampling.get(suite) or sampling.get("*") or SamplingSettings()


Item = tuple[EvalPrompt, int, dict[str, Any]]  # a prompt, a sample, and its row so far (response, settings, ...)


def run_eval(
    prompts: Sequence[EvalPrompt],
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    results_path: str | Path,
    model: str,
    judge: Judge | None = None,
    sampling: SamplingSettings | Mapping[str, SamplingSettings] | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    chat_format: str | TurnLayout = AUTO,
    judge_part: str | None = None,
    prefill_separator: str = PREFILL_SEPARATOR,
) -> list[dict[str, Any]]:
    """Generate and judge every rollout not already done in `results_path`, appending a row as each is judged.

    Args:
        sampling: How to decode: one setting for all, or one per suite name (`"*"` for the rest).
        settings: Extra fields recorded in every new row (the preset, the harmfulness threshold, ...); `preset` is
            compared on resuming.
        chat_format: The model family (see `chat_formats`; `auto` recognises the tokenizer's template), or its
            [`TurnLayout`]: how prompts and prefills are rendered and responses split.
        judge_part: What the judge reads: `both` (trace and answer), `trace` or `answer`; None: the judge's own
            default (`both` for the LLM judges, `answer` for the guards).
        prefill_separator: Put between the family's trace opening and a forced prefill (the reference's space).

    Rollouts already holding a verdict are skipped; those that lack one (the judge failed, or there was no judge)
    are judged again from the stored response when a judge is given. A stored rollout made under other generation
    settings, or judged under another judge, rubric or judged part, is refused (ValueError naming the differences).
    Capability prompts need no judge: they are scored against their answer, in this (the main) thread. Generation
    runs longest prompt first, so that batches hold similar lengths and a batch too large for memory fails at the
    start rather than hours in.

    Returns:
        The rows of `prompts`, from the file, in the order of `prompts` and their samples.
    """
    layout = chat_format if isinstance(chat_format, TurnLayout) else turn_layout(tokenizer, chat_format)
    results = ResultsFile(results_path, model)
    describe = getattr(generator, "describe", None)  # a generator of the user's may not say
    extra = {**(settings or {}), **(describe() if describe else {"backend": type(generator).__name__})}
    judge_name = judge.name if judge is not None else "none"
    judge_part = judge_part or (judge.default_part if judge is not None else "both")
    resolved = layout.resolved
    template = {
        "chat_format": layout.family,
        "chat_format_turn": getattr(resolved.format, "assistant_turn", None) if layout.family == "declared" else None,
        "chat_template_kwargs": dict(resolved.template_kwargs) or None,
    }

    def needs_verdict(prompt: EvalPrompt) -> bool:
        return judge is not None or prompt.expect == CAPABILITY

    def judged_under(prompt: EvalPrompt) -> dict[str, Any]:
        if prompt.expect == CAPABILITY:
            scorer = {"judge": "answer-match", "judge_model": None, "judge_rubric": prompt.answer_format}
            return {**scorer, "judge_prompt_sha256": None, "judge_part": None}
        described = judge.describe(prompt) if judge is not None else {"judge": judge_name}
        return {**described, "judge_part": judge_part}

    rendered: dict[tuple[str, str], RenderedPrompt] = {}
    generation: dict[tuple[str, str], dict[str, Any]] = {}
    to_generate: list[tuple[EvalPrompt, list[int]]] = []
    to_judge: list[Item] = []
    conflicts: list[str] = []
    for prompt in prompts:
        prompt_sampling = _sampling_for(sampling, prompt.suite)
        rendered[prompt.key] = render_prompt(tokenizer, prompt, layout, prefill_separator)
        generation[prompt.key] = {
            **prompt_sampling.record(),
            **template,
            "prompt_format": prompt.prompt_format,
            "prefill": rendered[prompt.key].prefill,
            "prefill_separator": prefill_separator if rendered[prompt.key].prefill else None,
            "dataset": prompt.dataset,
            "dataset_revision": prompt.dataset_revision,
            **extra,
        }
        missing = []
        for sample in range(prompt_sampling.samples):
            row = results.rows.get((prompt.suite, prompt.id, sample))
            if row is None:
                missing.append(sample)
                continue
            where = f"{prompt.suite}/{prompt.id} sample {sample}"
            conflicts += [f"{where}: {d}" for d in differences(row, generation[prompt.key], GENERATION_SETTINGS)]
            verdict = has_verdict(row)
            if verdict and needs_verdict(prompt) and prompt.expect != CAPABILITY:
                conflicts += [f"{where}: {d}" for d in differences(row, judged_under(prompt), JUDGE_SETTINGS)]
            elif needs_verdict(prompt) and not verdict:
                to_judge.append((prompt, sample, row))
        if missing:
            to_generate.append((prompt, missing))
    if conflicts:
        raise ValueError(
            f"{results_path} holds {len(conflicts)} setting(s) of rollouts made or judged otherwise than this run "
            f"({'; '.join(conflicts[:3])}{'; ...' if len(conflicts) > 3 else ''}): give another --out, or run with "
            "the same settings."
        )

    groups: dict[SamplingSettings, list[tuple[EvalPrompt, list[int]]]] = {}
    for prompt, missing in to_generate:
        groups.setdefault(_sampling_for(sampling, prompt.suite), []).append((prompt, missing))
    for items in groups.values():
        items.sort(key=lambda item: -len(rendered[item[0].key].text))
    batch_judge = judge is not None and judge.batch_size > 1

    def response_parts(row: dict[str, Any]) -> ResponseParts:
        return ResponseParts.from_row(row) or split_response(row["response"], layout)

    def judged(row: dict[str, Any]) -> str:
        judged_from = int(row.get("judged_from") or 0)
        return judged_text(row["response"], response_parts(row), judge_part, judged_from)

    def write(prompt: EvalPrompt, row: dict[str, Any], verdict: Verdict) -> None:
        fields = {
            "extracted": verdict.extracted,
            "correct": verdict.correct,
            "score": verdict.score,
            "refused": verdict.refused,
            "refusal_class": verdict.refusal_class,
            "harmful": verdict.harmful,
            "rubric_score": verdict.rubric_score,
            "votes": verdict.votes,
            "judge_details": verdict.details,
            "judge_truncated": verdict.truncated,
            "judge_raw": verdict.raw,
            "error": verdict.error,
        }
        results.append({**row, **judged_under(prompt), **fields})

    def score(items: list[Item]) -> None:
        for prompt, _, row in items:
            try:
                verdict = score_capability(prompt, row["response"], final_text(row["response"], response_parts(row)))
            except ImportError:
                raise
            except Exception as error:  # one prompt's failure must not lose the others' rows
                verdict = Verdict(error=f"{type(error).__name__}: {error}")
            write(prompt, row, verdict)

    def finish(items: list[Item]) -> None:
        verdicts: list[Verdict] = [Verdict() for _ in items]
        if judge is not None:
            pairs = [(prompt, judged(row)) for prompt, _, row in items]
            try:
                verdicts = list(judge.judge_batch(pairs))
            except Exception as error:
                verdicts = [Verdict(error=f"{type(error).__name__}: {error}") for _ in items]
        for (prompt, _, row), verdict in zip(items, verdicts, strict=True):
            write(prompt, row, verdict)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total_generate = sum(len(items) for items in groups.values())
    total_judge = len(to_judge) + sum(
        len(missing) for items in groups.values() for prompt, missing in items if needs_verdict(prompt)
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        generating = bar.add_task("generating", total=total_generate)
        judging = bar.add_task("judging", total=total_judge, visible=total_judge > 0)
        # Not a `with` block: on Ctrl-C the queue of judge requests is dropped at once rather than waited for
        pool = ThreadPoolExecutor(max_workers=judge.max_workers if judge is not None else 1)
        futures = []
        submitted: list[tuple[Any, list[Item]]] = []
        try:

            def dispatch(items: list[Item]) -> None:
                """Score capability rollouts here; judge the others in the pool (or keep them unjudged)."""
                scored = [item for item in items if item[0].expect == CAPABILITY]
                if scored:
                    score(scored)
                    bar.advance(judging, len(scored))
                others = [item for item in items if item[0].expect != CAPABILITY]
                if judge is None:
                    for prompt, _, row in others:
                        write(prompt, row, Verdict())
                    return
                for chunk in [others] if batch_judge else [[item] for item in others]:
                    if not chunk:
                        continue
                    future = pool.submit(finish, chunk)
                    futures.append(future)
                    submitted.append((future, chunk))
                    future.add_done_callback(functools.partial(_advance, bar, judging, len(chunk)))

            # Judged again, a row keeps the settings it was generated with
            dispatch(to_judge)
            for sampling_settings, items in groups.items():
                for start in range(0, len(items), generator.batch_size):
                    batch = items[start : start + generator.batch_size]
                    completions = generator.generate([rendered[p.key] for p, _ in batch], sampling_settings)
                    finished: list[Item] = []
                    for (prompt, missing), samples in zip(batch, completions, strict=True):
                        made = rendered[prompt.key], layout, generation[prompt.key]
                        finished += [(prompt, n, _new_row(model, prompt, n, samples[n], *made)) for n in missing]
                    dispatch(finished)
                    bar.advance(generating, len(batch))
            for future in futures:
                future.result()  # a failure outside judging (a bad row, a full disk) surfaces here
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            # Requests already answering get a moment; what was generated but is still not judged is kept, unjudged:
            # the same command judges it without generating again
            wait([future for future, _ in submitted], timeout=INTERRUPT_GRACE_SECONDS)
            unjudged = 0
            for future, items in submitted:
                if future.cancelled() or not future.done():
                    for prompt, _, row in items:
                        write(prompt, row, Verdict(error="interrupted before it was judged"))
                        unjudged += 1
            judged = sum(has_verdict(row) for row in results.rows.values())
            raise EvalInterrupted(results.path, judged, unjudged, len(results.rows)) from None
        pool.shutdown()
    keys = [(p.suite, p.id, s) for p in prompts for s in range(_sampling_for(sampling, p.suite).samples)]
    return [results.rows[key] for key in keys if key in results.rows]


def _new_row(
    model: str,
    prompt: EvalPrompt,
    sample: int,
    completion: Completion,
    rendered: RenderedPrompt,
    layout: TurnLayout,
    generation: dict[str, Any],
) -> dict[str, Any]:
    """A rollout's row before its verdict: the prompt, the response (what was forced, then what the model wrote),
    where its trace and answer lie, why generation stopped, and the settings it was made under."""
    response = rendered.forced + completion.text
    return {
        "model": model,
        "suite": prompt.suite,
        "id": prompt.id,
        "sample": sample,
        "expect": prompt.expect,
        "category": prompt.category,
        "prompt": prompt.messages,
        "objective": prompt.objective,
        "judged_from": rendered.judged_from,
        "response": response,
        "finish_reason": completion.finish_reason,
        "completion_tokens": completion.tokens,
        **split_response(response, layout).record(),
        "answer": prompt.answer,
        **generation,
    }


def _advance(bar: Any, task: Any, count: int, _future: Any) -> None:
    bar.advance(task, count)


def default_results_path(label: str) -> Path:
    """`safekey_eval/<label>.jsonl`, the label made safe for a file name."""
    return Path("safekey_eval") / (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.") + ".jsonl")
