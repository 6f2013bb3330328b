"""Replay: completions read from a file instead of generated, to score or judge generations made elsewhere.

The file is JSONL, one completion a line::

    {"suite": str, "id": str | int, "sample": int, "completion": str, "finish_reason": "stop" | "length"}

`suite` and `id` name the prompt as a results file does (a registry suite's name, or a prompt file's stem, and the
prompt's id). `completion` is what the model wrote after the prompt: after the generation prompt and, under a
prefilling attack, after the forced prefill (the family's markers as the model emits them: `</think>`, harmony's
channels). `sample` (default: the order of the prompt's lines, from 0) numbers a prompt's rollouts;
`finish_reason` is recorded when given. A greedy run needs one completion per prompt; a prompt the run asks for that
the file lacks is an error naming it, never a silent skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .generation import Completion, SamplingSettings
from .rendering import RenderedPrompt
from .suites import PromptFileError
from .suites.files import file_revision, read_jsonl

FINISH_REASONS = ("stop", "length")


class ReplayGenerator:
    """A [`Generator`][safekey_trl.evaluation.generation.Generator] serving the completions of a JSONL file."""

    def __init__(self, path: str | Path, batch_size: int = 64):
        self.path, self.batch_size = Path(path), batch_size
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such replay file")
        self.completions: dict[tuple[str, str], dict[int, Completion]] = {}
        self.sha256 = file_revision(self.path).removeprefix("sha256:")
        for number, row in read_jsonl(self.path):
            self._add(row, str(self.path), number)

    def _add(self, row: Any, source: str, number: int) -> None:
        if not isinstance(row, dict):
            raise PromptFileError(source, number, "<row>", "expected a JSON object")
        for name in ("suite", "id", "completion"):
            if name not in row:
                raise PromptFileError(source, number, name, "missing")
        if not isinstance(row["completion"], str):
            raise PromptFileError(source, number, "completion", "expected a string")
        finish = row.get("finish_reason")
        if finish is not None and finish not in FINISH_REASONS:
            raise PromptFileError(source, number, "finish_reason", f"expected stop or length, got {finish!r}")
        rollouts = self.completions.setdefault((str(row["suite"]), str(row["id"])), {})
        sample = row.get("sample", len(rollouts))
        if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
            raise PromptFileError(source, number, "sample", "expected a non-negative integer")
        if sample in rollouts:
            raise PromptFileError(
                source, number, "sample", f"a second completion of {row['suite']}/{row['id']} sample {sample}"
            )
        rollouts[sample] = Completion(row["completion"], finish)

    def describe(self) -> dict[str, Any]:
        return {"backend": "replay", "replay_file": str(self.path), "replay_sha256": self.sha256}

    def generate(self, prompts: Sequence[RenderedPrompt], sampling: SamplingSettings) -> list[list[Completion]]:
        """The file's completions of each prompt, `sampling.samples` of them (greedy: one, repeated)."""
        batch = []
        for prompt in prompts:
            suite, prompt_id = prompt.key
            rollouts = self.completions.get((suite, prompt_id), {})
            wanted = 1 if sampling.greedy else sampling.samples
            missing = [sample for sample in range(wanted) if sample not in rollouts]
            if missing:
                raise ValueError(
                    f"{self.path}: no completion for suite {suite!r}, id {prompt_id!r}, sample {missing[0]} "
                    f"({len(rollouts)} in the file, {wanted} needed)"
                )
            completions = [rollouts[sample] for sample in range(wanted)]
            batch.append(completions * sampling.samples if sampling.greedy else completions)
        return batch
