"""Running an evaluation: generate, judge or score, and append one row per rollout to a results file that resumes.

Results are appended to a JSONL file, one row per (suite, prompt id, sample), as each is judged. Running again on
the same file resumes: rollouts with a verdict are skipped, rollouts whose judging failed (or that ran without a
judge) are judged again from the stored response without generating again. When a rollout has several rows, the
last one counts. Every number of a summary or report is counted from these rows.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from .generation import Generator, SamplingSettings, render_prompt
from .judges import Judge, Verdict, judged_text
from .scoring import has_verdict, score_capability
from .suites import CAPABILITY, EvalPrompt

logger = logging.getLogger(__name__)

RowKey = tuple[str, str, int]


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


# The fields of a result row; any others are the run's settings (sampling, ...), kept when a row is judged again
ROW_FIELDS = (
    "model",
    "suite",
    "id",
    "sample",
    "expect",
    "category",
    "prompt",
    "objective",
    "prefill",
    "judged_from",
    "response",
    "answer",
    "extracted",
    "correct",
    "score",
    "refused",
    "refusal_class",
    "judge",
    "judge_raw",
    "error",
)


def _result_row(
    model: str,
    prompt: EvalPrompt,
    sample: int,
    prefill: str | None,
    judged_from: int,
    response: str,
    verdict: Verdict,
    judge: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    return {
        "model": model,
        "suite": prompt.suite,
        "id": prompt.id,
        "sample": sample,
        "expect": prompt.expect,
        "category": prompt.category,
        "prompt": prompt.messages,
        "objective": prompt.objective,
        "prefill": prefill,
        "judged_from": judged_from,
        "response": response,
        "answer": prompt.answer,
        "extracted": verdict.extracted,
        "correct": verdict.correct,
        "score": verdict.score,
        "refused": verdict.refused,
        "refusal_class": verdict.refusal_class,
        "judge": judge,
        "judge_raw": verdict.raw,
        "error": verdict.error,
        **settings,
    }


def _sampling_for(sampling: SamplingSettings | Mapping[str, SamplingSettings] | None, suite: str) -> SamplingSettings:
    if sampling is None:
        return SamplingSettings()
    if isinstance(sampling, SamplingSettings):
        return sampling
    return sampling.get(suite) or sampling.get("*") or SamplingSettings()


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
) -> list[dict[str, Any]]:
    """Generate and judge every rollout not already done in `results_path`, appending a row as each is judged.

    Args:
        sampling: How to decode: one setting for all, or one per suite name (`"*"` for the rest).
        settings: Extra fields recorded in every new row (the model's path, the judge rubric, ...).

    Rollouts already holding a verdict are skipped; those that lack one (the judge failed, or there was no judge)
    are judged again from the stored response when a judge is given. Capability prompts need no judge: they are
    scored against their answer. Generation runs longest prompt first, so that batches hold similar lengths and a
    batch too large for memory fails at the start rather than hours in; judging runs in `judge.max_workers`
    threads (or in whole batches for a batch judge) while the next batch generates.

    Returns:
        The rows of `prompts`, from the file, in the order of `prompts` and their samples.
    """
    results = ResultsFile(results_path, model)
    settings = settings or {}

    def needs_verdict(prompt: EvalPrompt) -> bool:
        return judge is not None or prompt.expect == CAPABILITY

    to_generate: list[tuple[EvalPrompt, list[int]]] = []
    to_judge: list[tuple[EvalPrompt, int, dict[str, Any]]] = []
    for prompt in prompts:
        missing = []
        for sample in range(_sampling_for(sampling, prompt.suite).samples):
            row = results.rows.get((prompt.suite, prompt.id, sample))
            if row is None:
                missing.append(sample)
            elif needs_verdict(prompt) and not has_verdict(row):
                to_judge.append((prompt, sample, row))
        if missing:
            to_generate.append((prompt, missing))

    groups: dict[SamplingSettings, list[tuple[EvalPrompt, list[int], Any]]] = {}
    for prompt, missing in to_generate:
        groups.setdefault(_sampling_for(sampling, prompt.suite), []).append(
            (prompt, missing, render_prompt(tokenizer, prompt))
        )
    for items in groups.values():
        items.sort(key=lambda item: -len(item[2].text))
    judge_name = judge.name if judge is not None else "none"
    batch_judge = judge is not None and judge.batch_size > 1

    def finish(items: list[tuple[EvalPrompt, int, str | None, int, str, dict[str, Any]]]) -> None:
        verdicts: list[Verdict] = [Verdict() for _ in items]
        judged = [i for i, item in enumerate(items) if item[0].expect != CAPABILITY and judge is not None]
        for i, (prompt, _, _, _, response, _) in enumerate(items):
            if prompt.expect == CAPABILITY:
                try:
                    verdicts[i] = score_capability(prompt, response)
                except ImportError:
                    raise
                except Exception as error:  # one prompt's failure must not lose the others' rows
                    verdicts[i] = Verdict(error=f"{type(error).__name__}: {error}")
        if judged:
            pairs = [(items[i][0], judged_text(items[i][4], items[i][3])) for i in judged]
            try:
                for i, verdict in zip(judged, judge.judge_batch(pairs), strict=True):  # type: ignore[union-attr]
                    verdicts[i] = verdict
            except Exception as error:
                for i in judged:
                    verdicts[i] = Verdict(error=f"{type(error).__name__}: {error}")
        for item, verdict in zip(items, verdicts, strict=True):
            prompt, sample, prefill, judged_from, response, row_settings = item
            name = "answer-match" if prompt.expect == CAPABILITY else judge_name
            results.append(
                _result_row(model, prompt, sample, prefill, judged_from, response, verdict, name, row_settings)
            )

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total_generate = sum(len(items) for items in groups.values())
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        generating = bar.add_task("generating", total=total_generate)
        judging = bar.add_task("judging", total=total_generate + len(to_judge), visible=judge is not None)
        with ThreadPoolExecutor(max_workers=judge.max_workers if judge is not None else 1) as pool:
            futures = []

            def submit(items: list) -> None:
                future = pool.submit(finish, items)
                futures.append(future)
                future.add_done_callback(lambda _: bar.advance(judging, len(items)))

            for prompt, sample, row in to_judge:
                # Judged again, the row keeps the settings it was generated with
                kept = {key: value for key, value in row.items() if key not in ROW_FIELDS}
                item = (prompt, sample, row.get("prefill"), int(row.get("judged_from") or 0), row["response"], kept)
                submit([item])
            for sampling_settings, items in groups.items():
                row_settings = {**sampling_settings.record(), **settings}
                for start in range(0, len(items), generator.batch_size):
                    batch = items[start : start + generator.batch_size]
                    completions = generator.generate([rendered.text for _, _, rendered in batch], sampling_settings)
                    finished = []
                    for (prompt, missing, rendered), samples in zip(batch, completions, strict=True):
                        # The prefill is the attacker's text: only what the model wrote after it is judged
                        judged_from = len(rendered.forced) if rendered.prefill else 0
                        for sample in missing:
                            response = rendered.forced + samples[sample]
                            finished.append((prompt, sample, rendered.prefill, judged_from, response, row_settings))
                    if batch_judge:
                        submit(finished)
                    else:
                        for item in finished:
                            submit([item])
                    bar.advance(generating, len(batch))
            for future in futures:
                future.result()  # a failure outside judging (a bad row, a full disk) surfaces here
    keys = [(p.suite, p.id, s) for p in prompts for s in range(_sampling_for(sampling, p.suite).samples)]
    return [results.rows[key] for key in keys if key in results.rows]


def default_results_path(label: str) -> Path:
    """`safekey_eval/<label>.jsonl`, the label made safe for a file name."""
    return Path("safekey_eval") / (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.") + ".jsonl")
