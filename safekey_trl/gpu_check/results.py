"""What a check found, and the rules it decides by: elementwise and relative comparisons, finiteness, and whether a
loss fell."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# (rtol, atol) within which two computations of the same quantity agree elementwise, by the dtype they ran in
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2)}
# ‖got − expected‖ / ‖expected‖ within which two computations of one tensor agree, by dtype: bf16 keeps 8 bits of
# mantissa (a relative rounding of 2^-9 per element), and sums over thousands of terms drift to about 1e-2 at worst.
# A halved gradient is 0.5 away, a zeroed one 1.0.
RELATIVE_TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

STATUSES = ("pass", "fail", "skip", "error", "timeout")


@dataclass
class CheckResult:
    """What one check found: `status` is pass, fail, skip, error or timeout; `detail` says why or what was seen.

    `skipped` names the parts of a check that could not run here and why (flash-attention 2 without `flash_attn`):
    they are reported, never dropped."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    measurements: dict[str, float] = field(default_factory=dict)
    output: str = ""  # long text to append to the report (the benchmark's tables)
    skipped: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """The difference between two tensors, and the one allowed there (elementwise at the worst element, or the
    relative norm of the difference)."""

    label: str
    max_difference: float
    allowed: float

    @property
    def ok(self) -> bool:
        # NaN compares false: a NaN anywhere fails
        return self.max_difference <= self.allowed

    def __str__(self) -> str:
        return f"{self.label}: {self.max_difference:.2e} (allowed {self.allowed:.2e})"


def compare(label: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """`got` against `expected` elementwise: |got − expected| ≤ atol + rtol·|expected|, as `torch.testing` does.

    Reports the largest difference and the tolerance allowed at that element's place (the tightest, if none
    fails: so the margin shows). A NaN or infinity in either fails."""
    rtol, atol = TOLERANCES[dtype]
    expected = expected.detach().float()
    got = got.detach().float().to(expected.device)
    if got.shape != expected.shape:
        return Comparison(f"{label} (shapes {tuple(got.shape)} vs {tuple(expected.shape)})", float("inf"), 0.0)
    if not expected.numel():
        return Comparison(label, 0.0, atol)
    if not (torch.isfinite(got).all() and torch.isfinite(expected).all()):
        return Comparison(f"{label} (not finite)", float("nan"), atol)
    difference = (got - expected).abs()
    allowed = atol + rtol * expected.abs()
    worst = int((difference - allowed).flatten().argmax())
    return Comparison(label, float(difference.flatten()[worst]), float(allowed.flatten()[worst]))


def compare_relative(
    label: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tolerance: float | None = None
) -> Comparison:
    """`got` against `expected` as a whole: ‖got − expected‖ / ‖expected‖ ≤ the dtype's relative tolerance.

    For tensors whose entries are small next to any fixed absolute tolerance (gradients, weight updates): a zeroed
    or halved tensor fails whatever its scale. An all-zero `expected` needs an all-zero `got`."""
    allowed = RELATIVE_TOLERANCES[dtype] if tolerance is None else tolerance
    expected = expected.detach().float()
    got = got.detach().float().to(expected.device)
    if got.shape != expected.shape:
        return Comparison(f"{label} (shapes {tuple(got.shape)} vs {tuple(expected.shape)})", float("inf"), allowed)
    if not (torch.isfinite(got).all() and torch.isfinite(expected).all()):
        return Comparison(f"{label} (not finite)", float("nan"), allowed)
    difference = float(torch.linalg.vector_norm(got - expected))
    scale = float(torch.linalg.vector_norm(expected))
    if scale == 0.0:
        return Comparison(f"{label} (relative to zero)", 0.0 if difference == 0.0 else float("inf"), allowed)
    return Comparison(f"{label} (relative)", difference / scale, allowed)


def finite(label: str, value: torch.Tensor) -> Comparison:
    """A comparison that fails when `value` holds a NaN or an infinity (the difference is how many)."""
    bad = int((~torch.isfinite(value.detach())).sum())
    return Comparison(f"{label} finite", float(bad), 0.0)


def result_from_comparisons(name: str, comparisons: list[Comparison], extra: str = "") -> CheckResult:
    """Pass when every comparison holds; the detail names the failing ones (or those nearest their tolerance)."""
    failing = [c for c in comparisons if not c.ok]

    def margin(comparison: Comparison) -> float:
        return comparison.max_difference / max(comparison.allowed, 1e-30)

    shown = failing or sorted(comparisons, key=margin)[-2:]
    detail = "; ".join(str(c) for c in shown) + (f"; {extra}" if extra else "")
    return CheckResult(
        name,
        "fail" if failing else "pass",
        detail,
        measurements={c.label: c.max_difference for c in comparisons},
    )


def loss_fell(losses: list[float], window: int = 2, margin: float = 0.01) -> tuple[bool, str]:
    """Whether training on a fixed batch lowered the loss: the mean of the last `window` losses is below the mean of
    the first `window` by more than `margin` (relative).

    One step against another is noise-bound (on a CPU, 8.478, 8.417, 8.442, 8.454 over four shuffled steps);
    repeating one batch with the auxiliary terms on from the first step makes the fall steady (a 4% drop over
    six steps on a CPU, `tests/test_gpu_check.py`), and the means of windows absorb one noisy step."""
    if len(losses) < 2 * window:
        return False, f"{len(losses)} losses logged, {2 * window} needed"
    if not all(math.isfinite(loss) for loss in losses):
        return False, f"a loss is not finite: {', '.join(f'{x:.3f}' for x in losses)}"
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    fell = last < first * (1 - margin)
    verdict = "fell" if fell else f"did not fall by {margin:.0%}"
    return fell, f"loss {verdict}: mean of the first {window} {first:.4f}, of the last {window} {last:.4f}"
