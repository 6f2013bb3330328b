"""`make gpu-check`: the comparisons, the run loop (budgets, failures, skips) and the report, on a CPU; the checks
that mean something on a CPU run here in float32."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch

from safekey_trl import gpu_check
from safekey_trl.gpu_check import (
    Check,
    CheckResult,
    Comparison,
    check_lm_head_kernels,
    check_query_mask_attention,
    compare,
    render_table,
    result_from_comparisons,
    run_checks,
    write_report,
)


def test_compare_uses_the_dtypes_tolerance_at_the_worst_element():
    expected = torch.tensor([1.0, 2.1, -3.0])
    got = torch.tensor([1.0, 2.0, -3.0])
    float32 = compare("x", got, expected, torch.float32)
    assert float32.max_difference == pytest.approx(0.1, abs=1e-6)
    assert float32.allowed == pytest.approx(1e-5 + 1e-4 * 2.1)
    assert not float32.ok
    # bf16: 0.02 + 0.02 · |2.05| = 0.061 allows 0.05
    within = compare("x", torch.tensor([1.0, 2.0, -3.0]), torch.tensor([1.0, 2.05, -3.0]), torch.bfloat16)
    assert within.ok and within.max_difference == pytest.approx(0.05, abs=1e-6)
    assert not compare("x", got, expected, torch.bfloat16).ok  # 0.1 > 0.062
    assert not compare("x", got[:2], expected, torch.float32).ok  # shapes differ


def test_a_check_fails_on_any_failing_comparison_and_names_it():
    good, bad = Comparison("loss", 1e-6, 1e-5), Comparison("grad of w", 0.5, 0.01)
    assert result_from_comparisons("c", [good]).status == "pass"
    result = result_from_comparisons("c", [good, bad], "2 kernels")
    assert result.status == "fail"
    assert result.detail == "grad of w: 5.00e-01 (allowed 1.00e-02); 2 kernels"
    assert result.measurements == {"loss": 1e-6, "grad of w": 0.5}


def test_query_mask_agrees_across_sdpa_and_eager_in_float32_on_cpu():
    result = check_query_mask_attention("cpu", torch.float32, "tiny", ["eager", "sdpa"])
    assert result.status == "pass", result.detail
    # Hidden, the query's tokens leave every later logit exactly as it was; visible, they move them
    assert result.measurements["sdpa logits after the query, query changed"] == 0.0
    assert result.measurements["eager logits after the query, query changed"] == 0.0
    assert result.measurements["query visible, query changed"] > 0.1


def test_query_mask_check_catches_an_attention_that_drops_the_mask(monkeypatch):
    """What context parallelism does to the mask: plain causal attention, the query visible."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("causal_only", causal_only)
    AttentionMaskInterface.register("causal_only", sdpa_mask)
    result = check_query_mask_attention("cpu", torch.float32, "tiny", ["eager", "causal_only"])
    assert result.status == "fail"
    assert "causal_only L_QMM vs eager float32" in result.detail
    assert result.measurements["causal_only logits after the query, query changed"] > 0.01


def test_lm_head_kernels_agree_on_cpu():
    """TRL's torch fallback here (its Triton kernel on CUDA, where the defaults cross its tile edges)."""
    result = check_lm_head_kernels("cpu", torch.float32, tokens=300, vocab=500, hidden=16)
    assert result.status == "pass", result.detail
    assert {"TRL fused loss vs full logits", "tiled lm_head.weight grad"} <= result.measurements.keys()


# Check functions for the run loop, importable by its spawned processes
def passes() -> CheckResult:
    return CheckResult("", "pass", "fine")


def raises() -> CheckResult:
    raise RuntimeError("CUDA out of memory")


def dies() -> CheckResult:
    os._exit(3)


def hangs() -> CheckResult:
    time.sleep(600)
    return passes()


def runs_anywhere() -> None:
    return None


def test_the_run_goes_on_past_errors_crashes_and_timeouts():
    checks = [
        Check("raises", raises, 60, requires=runs_anywhere),
        Check("dies", dies, 60, requires=runs_anywhere),
        Check("hangs", hangs, 3, requires=runs_anywhere),
        Check("skipped", passes, 60, requires=lambda: "no CUDA device"),
        Check("passes", passes, 60, requires=runs_anywhere),
    ]
    start = time.monotonic()
    # Forked here, where no CUDA is touched (a real run spawns: slower to start, safe with CUDA)
    results = run_checks(checks, echo=lambda line: None, start_method="fork")
    assert time.monotonic() - start < 60
    assert [(r.name, r.status) for r in results] == [
        ("raises", "error"),
        ("dies", "error"),
        ("hangs", "timeout"),
        ("skipped", "skip"),
        ("passes", "pass"),
    ]
    assert "RuntimeError: CUDA out of memory" in results[0].detail
    assert "exit code 3" in results[1].detail
    assert "budget of 3 s" in results[2].detail
    assert results[3].detail == "no CUDA device"


def test_without_cuda_every_check_is_skipped_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = tmp_path / "gpu.md"
    assert gpu_check.main(["--report", str(report)]) == 0
    output = capsys.readouterr().out
    for check in gpu_check.CHECKS:
        assert f"| {check.name} | skip | 0 | no CUDA device |" in output
    assert not report.exists()


def test_report_has_the_date_the_device_the_table_and_the_benchmark(tmp_path):
    results = [
        CheckResult("lm_head", "pass", "TRL fused loss vs full logits: 1e-06 | ok", seconds=12.4),
        CheckResult("step_costs", "pass", "tables below", seconds=80, output="| tokens | plain SFT |\n|---|---|"),
    ]
    path = tmp_path / "docs" / "gpu.md"
    write_report(path, results, "NVIDIA H100 80GB HBM3", datetime.datetime(2026, 11, 26, 2, 30))
    text = path.read_text()
    assert "`make gpu-check` on 2026-11-26 02:30 UTC. Device: NVIDIA H100 80GB HBM3; torch " in text
    assert render_table(results) in text
    assert "| lm_head | pass | 12 | TRL fused loss vs full logits: 1e-06 \\| ok |" in text
    assert "## step_costs\n\n| tokens | plain SFT |" in text
