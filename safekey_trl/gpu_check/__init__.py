"""`make gpu-check`: what only a CUDA machine can check or measure, in one command of about eight minutes.

Each check runs in its own process under a time budget (a crash, an out-of-memory error or a hang in one leaves the
others running), in bf16 as the recipes train. Every check prints whether it ran, failed or was skipped and why, and
so does every part of one that cannot run here (flash-attention 2 without `flash_attn`). On CUDA the report,
`docs/gpu.md`, is rewritten after each check with the date, the device and the versions, so that a run stopped
part-way leaves what it measured. Without CUDA every check is reported as skipped and nothing is written.

    python -m safekey_trl.gpu_check                       # every check, default budgets
    python -m safekey_trl.gpu_check --only lm_head qlora  # some of them

Parts: `results` (what a check found, the comparisons it decides by), `runner` (processes, budgets, the report),
`attention` (the query-masked pass under each attention kernel), `kernels` (the LM head), `training` (QLoRA,
DeepSpeed ZeRO-3 through the CLI), `measure` (step costs, QLoRA memory against the plan).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from .attention import check_query_mask_attention
from .kernels import check_lm_head_kernels
from .measure import BENCH, ROOT, check_qlora_memory, check_step_costs
from .results import (
    CheckResult,
    Comparison,
    compare,
    compare_relative,
    finite,
    loss_fell,
    result_from_comparisons,
)
from .runner import (
    Check,
    describe_device,
    needs_cuda,
    needs_module,
    render_table,
    run_check,
    run_checks,
    summary,
    write_report,
)
from .training import check_qlora_step, check_zero3

REPORT = ROOT / "docs" / "gpu.md"
# The whole run's budget: the device machine gives one command 10 minutes; this leaves 2 for its start and imports
TOTAL_BUDGET = 480


def _needs_bench() -> str | None:
    return needs_cuda() or (None if BENCH.is_file() else f"no {BENCH.relative_to(ROOT)} in this checkout")


CHECKS = [
    Check(
        "query_mask_tiny",
        check_query_mask_attention,
        35,
        kwargs=dict(shape="tiny"),
        what="the query-masked pass with the data's masks (the whole prompt hidden from position 0) under eager, "
        "sdpa and flash-attention 2 in bf16: L_QMM finite, equal across them and to eager float32; K's logits "
        "unmoved when the prompt changes (moved when it is visible); tiny model",
    ),
    Check(
        "lm_head",
        check_lm_head_kernels,
        40,
        what="TRL's fused LM head (Triton) and SafeKey's tiled kernel against the full logits across TRL's tile "
        "edges in bf16: loss, and every parameter's gradient relative to its size; then the three timed on the "
        "7B model's LM head alone at 8,192 tokens",
    ),
    Check(
        "qlora",
        check_qlora_step,
        40,
        requires=needs_module("bitsandbytes", "a core requirement: reinstall safekey-trl"),
        what="a bf16 QLoRA run (nf4, double quantization) moves every LoRA tensor and the safety head, no 4-bit one",
    ),
    Check(
        "query_mask_7b_layer",
        check_query_mask_attention,
        45,
        kwargs=dict(shape="7b-layer"),
        what="the query-mask check on one layer of DeepSeek-R1-Distill-Qwen-7B's shape, prompts of about 2,048 tokens",
    ),
    Check(
        "zero3",
        check_zero3,
        100,
        requires=needs_module("deepspeed", "pip install 'safekey-trl[deepspeed]' or the wheelhouse"),
        what="`safekey-trl train --accelerate zero3` in bf16 (2 processes where there are 2 GPUs) overfitting one "
        "batch: the loss falls (means of the first and last 2 of 6 steps), a run resumed at step 3 ends where the "
        "straight one does, the export is clean",
    ),
    Check(
        "step_costs",
        check_step_costs,
        90,
        requires=_needs_bench,
        what="`bench/bench_safekey.py --shapes 7b-slice` in bf16 at 4,096 and 8,192 tokens: step time and peak "
        "memory of plain TRL SFT, SafeKey and the reference's way, full-logits SFT beside TRL's fused head",
    ),
    Check(
        "qlora_7b_memory",
        check_qlora_memory,
        130,
        requires=needs_module("bitsandbytes", "a core requirement: reinstall safekey-trl"),
        what="the qwen7b-qlora recipe at 8,192 tokens on a random model of R1-Distill-Qwen-7B's shape: peak GPU "
        "memory with the CUDA context against a 24 GB GPU (23,028 MiB), and the --dry_run plan against it",
    ),
]


def main(argv: list[str] | None = None, checks: list[Check] | None = None, start_method: str = "spawn") -> int:
    """Run the checks (`checks`, by default `CHECKS`) as the command line asks; 0 unless the arguments are wrong."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = checks if checks is not None else CHECKS
    parser.add_argument("--only", nargs="+", choices=[check.name for check in available], help="run only these")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every check's time budget")
    parser.add_argument("--report", type=Path, default=REPORT, help="where to write the report (CUDA runs only)")
    parser.add_argument("--list", action="store_true", help="list the checks, their budgets and what they check")
    args = parser.parse_args(argv)
    selected = [check for check in available if not args.only or check.name in args.only]
    if args.list:
        for check in selected:
            print(f"{check.name} ({check.budget:.0f} s): {check.what}")
        print(f"in all {sum(check.budget for check in selected) * args.budget_scale:.0f} s")
        return 0
    cuda = torch.cuda.is_available()
    started = datetime.datetime.now(datetime.UTC)
    command = "make gpu-check" + (f' ARGS="{" ".join(argv)}"' if argv else "")

    def record(results: list[CheckResult], pending: list[Check]) -> None:
        if cuda:
            write_report(args.report, results, describe_device(), started, pending, command)

    results = run_checks(selected, args.budget_scale, start_method=start_method, after_each=record)
    print()
    print(render_table(results))
    print()
    print(summary(results))
    if not cuda:
        print(f"\nno CUDA device: nothing ran, {args.report} left as it is")
        return 0
    print(f"\nwrote {args.report}")
    return 0


__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "Comparison",
    "TOTAL_BUDGET",
    "check_lm_head_kernels",
    "check_qlora_memory",
    "check_qlora_step",
    "check_query_mask_attention",
    "check_step_costs",
    "check_zero3",
    "compare",
    "compare_relative",
    "finite",
    "loss_fell",
    "main",
    "render_table",
    "result_from_comparisons",
    "run_check",
    "run_checks",
    "summary",
    "write_report",
]
