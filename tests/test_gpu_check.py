"""`make gpu-check` on a CPU: the comparisons and the rules checks decide by, the run loop (budgets, failures, skips,
the report after every check), and the checks' CPU-runnable parts run for real: the query-mask check with eager and
sdpa in bf16 and float32, the LM-head check with TRL's torch fallback, the loss criterion on a fixed-batch bf16 run,
the QLoRA memory path on a small shape, the benchmark one method at a time."""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from safekey_trl import gpu_check
from safekey_trl.gpu_check import (
    CHECKS,
    TOTAL_BUDGET,
    Check,
    CheckResult,
    Comparison,
    check_lm_head_kernels,
    check_qlora_memory,
    check_query_mask_attention,
    compare,
    compare_relative,
    loss_fell,
    render_table,
    result_from_comparisons,
    run_checks,
    write_report,
)
from safekey_trl.gpu_check.attention import query_mask_batch
from safekey_trl.gpu_check.measure import FITS_24GB, GIB, MemoryVerdict
from safekey_trl.gpu_check.training import fixed_batch_arguments, fixed_batch_data

# ---------------------------------------------------------------------------------------------------------------------
# Comparisons and criteria


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
    assert not compare("x", torch.tensor([1.0, float("nan"), -3.0]), expected, torch.bfloat16).ok


def test_relative_comparison_fails_a_zeroed_or_halved_gradient_whatever_its_scale():
    gradient = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-4  # far below bf16's atol 2e-2
    assert compare("g", torch.zeros_like(gradient), gradient, torch.bfloat16).ok  # what the old check allowed
    assert not compare_relative("g", torch.zeros_like(gradient), gradient, torch.bfloat16).ok
    halved = compare_relative("g", gradient / 2, gradient, torch.bfloat16)
    assert not halved.ok and halved.max_difference == pytest.approx(0.5)
    rounded = compare_relative("g", gradient.bfloat16(), gradient, torch.bfloat16)
    assert rounded.ok and rounded.max_difference < 5e-3
    assert not compare_relative("g", gradient * float("nan"), gradient, torch.bfloat16).ok
    assert compare_relative("g", torch.zeros(3), torch.zeros(3), torch.float32).ok
    assert not compare_relative("g", torch.ones(3), torch.zeros(3), torch.float32).ok


def test_a_check_fails_on_any_failing_comparison_and_names_it():
    good, bad = Comparison("loss", 1e-6, 1e-5), Comparison("grad of w", 0.5, 0.01)
    assert result_from_comparisons("c", [good]).status == "pass"
    result = result_from_comparisons("c", [good, bad], "2 kernels")
    assert result.status == "fail"
    assert result.detail == "grad of w: 5.00e-01 (allowed 1.00e-02); 2 kernels"
    assert result.measurements == {"loss": 1e-6, "grad of w": 0.5}


def test_loss_fell_compares_windows_not_single_steps():
    # Four shuffled steps on a CPU (the old check compared the 4th with the 1st): no evidence either way
    fell, detail = loss_fell([8.478, 8.417, 8.442, 8.454])
    assert not fell and "did not fall by 1%" in detail
    # The fixed-batch bf16 run on a CPU (below): a steady 4% over six steps, with one noisy step it still holds
    assert loss_fell([8.468, 8.356, 8.25, 8.154, 8.076, 8.012])[0]
    assert loss_fell([8.468, 8.356, 8.25, 8.40, 8.076, 8.012])[0]
    assert not loss_fell([8.468, 8.356, 8.25])[0]  # too few steps
    assert not loss_fell([8.468, 8.356, float("nan"), 8.154, 8.076, 8.012])[0]


def test_fixed_batch_bf16_run_lowers_the_loss_on_cpu(tmp_path):
    """The zero3 check's training arguments, in one process: the criterion holds with a wide margin."""
    from safekey_trl.gpu_check.training import logged_losses
    from safekey_trl.sft import parse_recipe, train

    # Shorter than the GPU check's (2 rows cut at 320 tokens, 4 steps): bf16 is slow on a CPU
    data = fixed_batch_data(tmp_path, rows=2)
    arguments = fixed_batch_arguments(data, tmp_path / "run", steps=4, processes=1, device="cpu")
    arguments += ["--max_length", "320", "--save_strategy", "steps", "--save_steps", "4"]
    trainer = train(*parse_recipe("tiny", arguments))
    losses = logged_losses(tmp_path / "run" / "checkpoint-4" / "trainer_state.json")
    assert len(losses) == 4
    assert all("qmm_loss" in entry for entry in trainer.state.log_history[:4])  # SafeKey's terms on from step 1
    fell, detail = loss_fell(losses)
    assert fell, detail
    assert sum(losses[-2:]) / 2 < 0.98 * sum(losses[:2]) / 2, losses  # twice the 1% margin


# ---------------------------------------------------------------------------------------------------------------------
# The query-mask check


def test_query_mask_batch_is_the_datas_mask():
    batch = query_mask_batch(rows=2)
    query_mask = batch["query_mask"]
    assert (query_mask[:, 0] == 0).all()  # the whole prompt hidden, from position 0
    prompt_end = (query_mask.cumsum(dim=1) == 0).sum(dim=1)
    assert (prompt_end > 10).all()  # leading positions with no visible key at all
    assert (query_mask.gather(1, prompt_end.unsqueeze(1)) == 1).all()
    assert (batch["key_mask"].sum(dim=1) > 0).all()
    long_prompt = query_mask_batch(rows=1, prompt_tokens=300)["query_mask"]
    assert int((long_prompt.cumsum(dim=1) == 0).sum()) >= 300


def test_query_mask_agrees_across_sdpa_and_eager_in_bf16_and_float32_on_cpu():
    result = check_query_mask_attention("cpu", (torch.bfloat16, torch.float32), "tiny", rows=2)
    assert result.status == "pass", result.detail
    # flash-attention 2 is reported as not run, with why, not dropped
    assert result.skipped == ["flash_attention_2: needs a CUDA device"]
    for dtype in ("bfloat16", "float32"):
        for attn in ("eager", "sdpa"):
            assert result.measurements[f"{attn} {dtype} L_QMM finite"] == 0
            # Hidden, the prompt's tokens leave K's logits exactly as they were
            assert result.measurements[f"{attn} {dtype} K logits, prompt changed"] == 0.0
            assert f"{attn} {dtype} L_QMM vs eager float32" in result.measurements
    assert result.measurements["sdpa vs eager bfloat16 L_QMM"] <= 2e-2
    assert result.measurements["prompt visible, prompt changed"] > 0.1  # visible, they move them
    assert "leading positions per row with no visible key" in result.detail


def _register(name: str, attention) -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)


def test_query_mask_check_catches_an_attention_that_drops_the_mask():
    """What context parallelism does to the mask: plain causal attention, the query visible."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    _register("causal_only", causal_only)
    result = check_query_mask_attention("cpu", (torch.float32,), "tiny", ("eager", "causal_only"), rows=2)
    assert result.status == "fail"
    assert "causal_only float32 L_QMM vs eager float32" in result.detail
    assert result.measurements["causal_only float32 K logits, prompt changed"] > 0.01


def test_query_mask_check_catches_nan_on_rows_that_see_no_key():
    """A fused kernel that writes NaN where a query has no visible key: the next layer reads NaN keys under the
    mask, and 0 · NaN poisons K."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def nan_on_blind_rows(module, query, key, value, attention_mask, **kwargs):
        output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        blind = ~attention_mask.any(dim=-1).squeeze(1)  # (batch, query positions)
        return output.masked_fill(blind[..., None, None], float("nan")), weights

    _register("nan_on_blind_rows", nan_on_blind_rows)
    result = check_query_mask_attention("cpu", (torch.bfloat16,), "tiny", ("eager", "nan_on_blind_rows"), rows=2)
    assert result.status == "fail"
    assert "nan_on_blind_rows bfloat16 L_QMM finite" in result.detail
    assert result.measurements["eager bfloat16 L_QMM finite"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# The LM-head check


def test_lm_head_kernels_agree_on_cpu():
    """TRL's torch fallback here (its Triton kernel on CUDA, where the defaults cross its tile edges)."""
    result = check_lm_head_kernels("cpu", torch.bfloat16, tokens=300, vocab=500, hidden=16, timing=(64, 32, 500))
    assert result.status == "pass", result.detail
    grads = [label for label in result.measurements if label.endswith("grad (relative)")]
    assert "tiled lm_head.weight grad (relative)" in grads and "TRL fused model.embed_tokens.weight grad (relative)"
    assert len(grads) == 2 * 14  # every parameter of the one-layer model but the key bias, for each kernel
    assert {"trl head ms", "tiled head ms", "full head ms"} <= result.measurements.keys()


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_lm_head_check_fails_a_kernel_with_zeroed_or_halved_gradients(monkeypatch, scale):
    from safekey_trl import lm_head

    real = lm_head.add_tiled_lm_head

    def scaled_gradients(model, **kwargs):
        """The tiled kernel, its loss unchanged but every gradient times `scale`."""
        real(model, **kwargs)
        forward = model.forward

        def scaled(*args, **kwargs):
            output = forward(*args, **kwargs)
            output.loss = output.loss * scale + output.loss.detach() * (1 - scale)
            return output

        model.forward = scaled

    monkeypatch.setattr(lm_head, "add_tiled_lm_head", scaled_gradients)
    # At this size the old elementwise tolerance (2e-2) let all-zero gradients through
    result = check_lm_head_kernels("cpu", torch.bfloat16, tokens=1000, vocab=4000, hidden=32, timing=None)
    assert result.status == "fail"
    assert result.measurements["tiled lm_head.weight grad (relative)"] == pytest.approx(1 - scale, abs=0.02)
    assert result.measurements["TRL fused lm_head.weight grad (relative)"] < 0.02
    trl_grads = [v for k, v in result.measurements.items() if k.startswith("TRL fused") and k.endswith("(relative)")]
    assert max(trl_grads) < 3e-2  # the real kernel passes at this size
    assert result.measurements["tiled loss vs full logits"] < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def test_memory_verdict_counts_the_context_and_holds_the_plan_to_the_peak():
    fits = MemoryVerdict(planned=9 * GIB, allocated=10 * GIB, reserved=11 * GIB, context=0.6 * GIB)
    assert fits.fits and fits.plan_holds and fits.peak == pytest.approx(11.6 * GIB)
    assert "fits in 22.49 GiB" in str(fits)
    too_big = MemoryVerdict(planned=9 * GIB, allocated=10 * GIB, reserved=FITS_24GB, context=0.5 * GIB)
    assert not too_big.fits and "does not fit" in str(too_big)
    optimistic = MemoryVerdict(planned=7 * GIB, allocated=10 * GIB, reserved=11 * GIB, context=0.5 * GIB)
    assert optimistic.fits and not optimistic.plan_holds and "less than 75% of the measured peak" in str(optimistic)


def test_qlora_memory_check_runs_the_recipe_on_a_small_shape_on_cpu():
    """The whole path but the CUDA numbers: a random model saved and loaded in nf4 by the recipe's loader, rows past
    `max_length`, the plan of `--dry_run`, two steps with SafeKey's terms on."""
    small = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1026,
        tie_word_embeddings=False,
    )
    result = check_qlora_memory("cpu", max_length=256, config_fields=small)
    assert result.status == "pass", result.detail
    assert "trained 2 steps with SafeKey's terms on (2 logged)" in result.detail
    assert result.measurements["planned GiB"] > 0


def test_bench_runs_each_method_alone(tmp_path, monkeypatch):
    """The benchmark's CUDA order (each model freed before the next is built), on a CPU and a small shape."""
    import argparse

    spec = importlib.util.spec_from_file_location("bench_safekey", ROOT / "bench" / "bench_safekey.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = bench.ModelShape(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=256, head_dim=16)
    args = argparse.Namespace(lengths=[64], batch_size=1, steps=1, device="cpu", dtype="float32", attn="sdpa")
    batches = {("small", 64): bench.make_batch(64, 1, shape.vocab, seed=0)}
    methods = ("plain SFT", "SafeKey, TRL head")  # two of the six: each builds a trainer
    monkeypatch.setattr(bench, "METHODS", methods)
    times, memory = bench.measure_one_at_a_time({"small": shape}, batches, args, str(tmp_path))
    assert set(times) == set(memory) == {("small", 64, method) for method in methods}
    assert all(value > 0 for value in times.values())
    assert bench.SHAPES["7b-slice"]() == bench.ModelShape(
        hidden=3584, intermediate=18944, layers=2, heads=28, kv_heads=4, vocab=152064, head_dim=None
    )


# ---------------------------------------------------------------------------------------------------------------------
# The run loop and the report


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


def hangs_with_a_child(marker: str) -> CheckResult:
    """A check stuck on a process it started (a benchmark, an accelerate launch)."""
    subprocess.run([sys.executable, "-c", f"import time; open({marker!r}, 'w').write('x'); time.sleep(600)"])
    return passes()


def part_skipped() -> CheckResult:
    return CheckResult("", "pass", "eager, sdpa agree", skipped=["flash_attention_2: `flash_attn` is not installed"])


def reads_the_report(path: str) -> CheckResult:
    return CheckResult("", "pass", "read it", output=Path(path).read_text())


def runs_anywhere() -> None:
    return None


def test_the_run_goes_on_past_errors_crashes_and_timeouts(tmp_path):
    marker = tmp_path / "child-started"
    checks = [
        Check("raises", raises, 60, requires=runs_anywhere),
        Check("dies", dies, 60, requires=runs_anywhere),
        Check("hangs", hangs, 3, requires=runs_anywhere),
        Check("hangs_with_a_child", hangs_with_a_child, 3, requires=runs_anywhere, kwargs=dict(marker=str(marker))),
        Check("skipped", passes, 60, requires=lambda: "no CUDA device"),
        Check("part_skipped", part_skipped, 60, requires=runs_anywhere),
        Check("passes", passes, 60, requires=runs_anywhere),
    ]
    start = time.monotonic()
    lines = []
    # Forked here, where no CUDA is touched (a real run spawns: slower to start, safe with CUDA)
    results = run_checks(checks, echo=lines.append, start_method="fork")
    assert time.monotonic() - start < 60
    assert [(r.name, r.status) for r in results] == [
        ("raises", "error"),
        ("dies", "error"),
        ("hangs", "timeout"),
        ("hangs_with_a_child", "timeout"),
        ("skipped", "skip"),
        ("part_skipped", "pass"),
        ("passes", "pass"),
    ]
    assert results[0].detail == "RuntimeError: CUDA out of memory"
    assert "exit code 3" in results[1].detail
    assert "budget of 3 s" in results[2].detail
    assert results[4].detail == "no CUDA device"
    # What a stopped check started is stopped with it: nothing is left running on the GPU for the next check
    assert marker.exists()
    leftover = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True)
    assert leftover.stdout == "", leftover.stdout
    # Every check says what became of it, and every part that could not run says so
    assert "skipped: skip (0 s) no CUDA device" in lines
    assert "part_skipped: part skipped: flash_attention_2: `flash_attn` is not installed" in lines
    table = render_table(results)
    assert "| part_skipped | pass | " in table and "skipped: flash_attention_2" in table
    assert "ran 6 of 7: 2 pass, 0 fail, 2 error, 2 timeout; skipped 1" in gpu_check.summary(results)


def test_without_cuda_every_check_is_skipped_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = tmp_path / "gpu.md"
    assert gpu_check.main(["--report", str(report)]) == 0
    output = capsys.readouterr().out
    for check in CHECKS:
        assert f"| {check.name} | skip | 0 | no CUDA device |" in output
        assert f"- skipped {check.name}: no CUDA device" in output
    assert f"ran 0 of {len(CHECKS)}" in output
    assert not report.exists()


def test_on_cuda_the_report_is_rewritten_after_each_check(tmp_path, monkeypatch):
    """A run stopped after the first check leaves its result and the rest marked pending."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "describe_device", lambda: "1 x Fake GPU (80 GiB)")
    report = tmp_path / "docs" / "gpu.md"
    checks = [
        Check("first", passes, 30, requires=runs_anywhere),
        Check("second", reads_the_report, 30, requires=runs_anywhere, kwargs=dict(path=str(report))),
        Check("third", passes, 30, requires=lambda: "`deepspeed` is not installed"),
    ]
    assert gpu_check.main(["--report", str(report)], checks=checks, start_method="fork") == 0
    text = report.read_text()
    # What the second check found on disk while it ran: the first one's result, itself and the third pending
    during = text.split("## second\n\n")[1]
    assert "| first | pass |" in during
    assert "| second | pending | |" in during and "| third | pending | |" in during
    assert "Stopped or still running: 1 of 3 done." in during
    # The final report: all three, the skip with its reason, the date in UTC and the device
    assert re.search(r"`make gpu-check ARGS=\"--report \S+\"` on \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "Device: 1 x Fake GPU (80 GiB); torch " in text
    assert "| third | skip | 0 | `deepspeed` is not installed |" in text
    assert "- skipped third: `deepspeed` is not installed" in text
    assert "pending" not in text.split("## second")[0]


def test_report_has_the_date_the_device_the_table_and_the_benchmark(tmp_path):
    results = [
        CheckResult("lm_head", "pass", "TRL fused loss vs full logits: 1e-06 | ok", seconds=12.4),
        CheckResult("step_costs", "pass", "tables below", seconds=80, output="| tokens | plain SFT |\n|---|---|"),
    ]
    path = tmp_path / "docs" / "gpu.md"
    when = datetime.datetime(2026, 11, 26, 2, 30, tzinfo=datetime.UTC)
    write_report(path, results, "1 x NVIDIA H100 80GB HBM3 (79 GiB)", when, versions="torch 2.13.0")
    text = path.read_text()
    assert (
        "`make gpu-check` on 2026-11-26 02:30 UTC. Device: 1 x NVIDIA H100 80GB HBM3 (79 GiB); torch 2.13.0." in text
    )
    assert render_table(results) in text
    assert "| lm_head | pass | 12 | TRL fused loss vs full logits: 1e-06 \\| ok |" in text
    assert "## step_costs\n\n| tokens | plain SFT |" in text


def test_budgets_leave_a_margin_in_the_device_machines_ten_minutes(capsys):
    assert sum(check.budget for check in CHECKS) <= TOTAL_BUDGET <= 8 * 60
    assert len({check.name for check in CHECKS}) == len(CHECKS)
    assert gpu_check.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "zero3 (100 s): `safekey-trl train --accelerate zero3` in bf16" in listed and "in all 480 s" in listed


def test_docs_list_every_check_with_its_budget():
    text = (ROOT / "docs" / "gpu.md").read_text()
    for check in CHECKS:
        assert re.search(rf"^\| {check.name} \| .+ \| {check.budget:.0f} \|$", text, re.MULTILINE), check.name
    assert "Still to be filled" in text  # no GPU has run it: no number in it is measured


def test_a_failed_launch_is_reported_by_the_exception_it_died_of():
    from safekey_trl.gpu_check.training import launch_failure

    output = """[rank0]: │ ❱ 218 │   assert len(set(t.dtype for t in tensors)) == 1                     │
[rank0]: │   219 │   assert len(set(t.device for t in tensors)) == 1                    │
[rank0]: ╰──────────────────────────────────────────────────────────────────────────────╯
[rank0]: AssertionError
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
  error_file: <N/A>
"""
    assert launch_failure(output) == "AssertionError at `218 │ assert len(set(t.dtype for t in tensors)) == 1`"
    assert launch_failure("ValueError: max_length must be positive\n") == "ValueError: max_length must be positive"


def test_the_device_is_read_without_touching_cuda(tmp_path, monkeypatch):
    """nvidia-smi names the GPUs: the parent process holds no CUDA context on the GPU the checks measure."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\necho 'NVIDIA H100 80GB HBM3, 81559'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: pytest.fail("CUDA touched"))
    from safekey_trl.gpu_check.runner import describe_device

    assert describe_device() == "2 x NVIDIA H100 80GB HBM3 (80 GiB)"
