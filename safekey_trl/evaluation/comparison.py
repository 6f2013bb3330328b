"""What `eval-report` counts beyond the rates: two runs compared on the same prompts (paired tests), each suite's
categories, how generation ended (finish reasons, truncation, trace length), and how much voting judges agree.

Runs are `(label, path, rows)` as `report.load_runs` gives them; rows are the results file's, one per rollout.

**Paired comparisons** pair two runs' rollouts by prompt (suite and id): a prompt counts when both runs hold a verdict
for it. A binary outcome (harmful, refused, correct) with one rollout per prompt in both runs is compared with
McNemar's exact test; with several rollouts per prompt, each prompt's mean outcome is one observation and the
comparison is a paired bootstrap, as it is for scores (the 1–5 harmfulness score, StrongREJECT's 0–1 score). The
bootstrap is seeded and its resamples and seed are reported.
"""

from __future__ import annotations

import statistics as stats
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from .scoring import harmful_of, row_threshold
from .statistics import BootstrapResult, agreement, cohen_kappa, fleiss_kappa, mcnemar_exact, paired_bootstrap
from .suites import BENIGN, CAPABILITY

Run = tuple[str, Path, list[dict[str, Any]]]
OUTCOMES = {"harmful": "harmful", BENIGN: "refused", CAPABILITY: "correct"}


def outcome(row: dict[str, Any], threshold: int | None = None) -> bool | None:
    """A row's binary outcome for its kind: harmful (a harmful prompt), refused (benign), correct (capability)."""
    kind = row.get("expect") or "harmful"
    if kind == BENIGN:
        return row.get("refused")
    if kind == CAPABILITY:
        return row.get("correct")
    return harmful_of(row, row_threshold(row, threshold))


def score_of(row: dict[str, Any], measure: str) -> float | None:
    """A harmful prompt's row's score: StrongREJECT's 0–1 `rubric_score`, or the 1–5 `score`."""
    value = row.get("rubric_score" if measure == "StrongREJECT score" else "score")
    return None if value is None else float(value)


def _by_prompt(rows: list[dict[str, Any]], value) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for row in rows:
        result = value(row)
        if result is not None:
            found.setdefault(str(row["id"]), []).append(float(result))
    return found


@dataclass(frozen=True)
class PairedResult:
    """Two runs on one suite and one measure: the prompts paired, each run's mean over them, and the test."""

    suite: str
    measure: str
    prompts: int
    base: float
    other: float
    test: str  # "McNemar exact" or "paired bootstrap"
    p_value: float
    discordant: tuple[int, int] | None = None  # McNemar's (b, c): base only, other only
    bootstrap: BootstrapResult | None = None

    @property
    def difference(self) -> float:
        return self.other - self.base


def compare(
    base_rows: list[dict[str, Any]],
    other_rows: list[dict[str, Any]],
    suite: str,
    threshold: int | None = None,
    resamples: int = 10000,
    seed: int = 0,
) -> list[PairedResult]:
    """Every measure two runs share on a suite, on the prompts both judged (see the module docstring); a suite that
    mixes kinds of prompts (a local file) is compared kind by kind."""
    base = [row for row in base_rows if row["suite"] == suite]
    other = [row for row in other_rows if row["suite"] == suite]
    results = []
    for kind in dict.fromkeys(row.get("expect") or "harmful" for row in base):
        of_kind = [row for row in base if (row.get("expect") or "harmful") == kind]
        others = [row for row in other if (row.get("expect") or "harmful") == kind]
        results += _compare_kind(of_kind, others, suite, kind, threshold, resamples, seed)
    return results


def _compare_kind(
    base: list[dict[str, Any]],
    other: list[dict[str, Any]],
    suite: str,
    kind: str,
    threshold: int | None,
    resamples: int,
    seed: int,
) -> list[PairedResult]:
    measures = [(OUTCOMES.get(kind, "harmful"), lambda row: outcome(row, threshold), True)]
    if kind == "harmful":
        for name in ("1–5 score", "StrongREJECT score"):
            measures.append((name, lambda row, name=name: score_of(row, name), False))
    results = []
    for measure, value, binary in measures:
        a, b = _by_prompt(base, value), _by_prompt(other, value)
        paired = [prompt for prompt in a if prompt in b]
        if not paired:
            continue
        means_a = [sum(a[p]) / len(a[p]) for p in paired]
        means_b = [sum(b[p]) / len(b[p]) for p in paired]
        mean_a, mean_b = sum(means_a) / len(paired), sum(means_b) / len(paired)
        if binary and all(len(a[p]) == 1 and len(b[p]) == 1 for p in paired):
            only_base = sum(a[p][0] == 1 and b[p][0] == 0 for p in paired)
            only_other = sum(a[p][0] == 0 and b[p][0] == 1 for p in paired)
            p_value = mcnemar_exact(only_base, only_other)
            discordant = (only_base, only_other)
            results.append(
                PairedResult(suite, measure, len(paired), mean_a, mean_b, "McNemar exact", p_value, discordant)
            )
        else:
            boot = paired_bootstrap(means_b, means_a, resamples, seed)
            results.append(
                PairedResult(
                    suite, measure, len(paired), mean_a, mean_b, "paired bootstrap", boot.p_value, bootstrap=boot
                )
            )
    return results


def paired_comparisons(
    runs: Sequence[Run], threshold: int | None = None, resamples: int = 10000, seed: int = 0
) -> list[tuple[str, str, list[PairedResult]]]:
    """Each run after the first against the first, on every suite both hold: `(base, other, results)`."""
    if len(runs) < 2:
        return []
    base_label, _, base_rows = runs[0]
    found = []
    for label, _, rows in runs[1:]:
        suites = list(dict.fromkeys(row["suite"] for row in base_rows))
        results = [r for suite in suites for r in compare(base_rows, rows, suite, threshold, resamples, seed)]
        if results:
            found.append((base_label, label, results))
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class GenerationStats:
    """How a run's generations ended: finish reasons, the share cut at `max_new_tokens`, trace lengths (characters,
    from the rows' trace spans), completion tokens where recorded, and judged texts cut to fit a judge."""

    rollouts: int
    finish_reasons: dict[str, int]
    truncation_rate: float
    trace_median: float | None
    trace_mean: float | None
    tokens_mean: float | None
    judge_truncated: int


def generation_stats(rows: list[dict[str, Any]]) -> GenerationStats:
    """The generation statistics of a run's rows."""
    reasons: dict[str, int] = {}
    for row in rows:
        reason = row.get("finish_reason") or "unknown"
        reasons[reason] = reasons.get(reason, 0) + 1
    traces = [span[1] - span[0] for row in rows if (span := row.get("trace_span"))]
    tokens = [row["completion_tokens"] for row in rows if row.get("completion_tokens") is not None]
    return GenerationStats(
        rollouts=len(rows),
        finish_reasons=dict(sorted(reasons.items())),
        truncation_rate=reasons.get("length", 0) / len(rows) if rows else 0.0,
        trace_median=stats.median(traces) if traces else None,
        trace_mean=stats.fmean(traces) if traces else None,
        tokens_mean=stats.fmean(tokens) if tokens else None,
        judge_truncated=sum(bool(row.get("judge_truncated")) for row in rows),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Judges' agreement


@dataclass(frozen=True)
class Agreement:
    """How much a vote's judges agree over a run's rollouts with every vote present: Fleiss' kappa over all of
    them, and for each pair the share of agreement and Cohen's kappa; `incomplete` rollouts lacked a vote."""

    voters: tuple[str, ...]
    rollouts: int
    incomplete: int
    fleiss: float
    pairs: tuple[tuple[str, str, float, float], ...]  # (voter, voter, agreement, Cohen's kappa)


def judge_agreement(rows: list[dict[str, Any]]) -> Agreement | None:
    """The agreement of the judges that voted on a run's rows (None when no row holds a vote of two or more)."""
    voted = [row["votes"] for row in rows if isinstance(row.get("votes"), dict) and len(row["votes"]) > 1]
    if not voted:
        return None
    voters = tuple(dict.fromkeys(name for votes in voted for name in votes))
    complete = [votes for votes in voted if all(votes.get(name) is not None for name in voters)]
    ratings = [[bool(votes[name]) for name in voters] for votes in complete]
    pairs = []
    for i, j in combinations(range(len(voters)), 2):
        a, b = [r[i] for r in ratings], [r[j] for r in ratings]
        pairs.append((voters[i], voters[j], agreement(a, b), cohen_kappa(a, b)))
    return Agreement(voters, len(complete), len(voted) - len(complete), fleiss_kappa(ratings), tuple(pairs))


def categories_of(runs: Sequence[Run], suite: str) -> list[str]:
    """A suite's categories over the runs, in first-seen order (rows without one left out)."""
    found = (row.get("category") for _, _, rows in runs for row in rows if row["suite"] == suite)
    return list(dict.fromkeys(str(category) for category in found if category not in (None, "")))
