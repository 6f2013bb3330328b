"""Measurements on CUDA: what a SafeKey step costs against plain TRL SFT and the reference's way on a slice of the 7B
model (`bench/bench_safekey.py`), and whether the QLoRA recipe at the paper's 8,192 tokens fits a 24 GB GPU, against
what `safekey-trl train --dry_run` planned."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..resources import sample_data_dir
from .attention import SAMPLE_FILE
from .results import CheckResult

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_safekey.py"
GIB = 2**30
# A "24 GB" GPU: an A10 has 23,028 MiB, an RTX 4090 24,564 MiB, an L4 22,491 MiB. The QLoRA recipes promise the
# first two; the peak, CUDA context included, must stay below the smaller.
FITS_24GB = 23028 * 2**20
# A plan that says less than this share of the measured peak would let a run start that cannot finish
PLAN_MIN_SHARE = 0.75
QLORA_RECIPE = "qwen7b-qlora"
REFERENCE_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


def bench_command(device: str, lengths: tuple[int, ...], shapes: tuple[str, ...], steps: int) -> tuple[list, str]:
    """The benchmark's command line for `device` in bf16, with flash-attention 2 where it is installed, and the
    attention it uses."""
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    command = [sys.executable, str(BENCH), "--device", device, "--dtype", "bfloat16", "--attn", attn]
    command += ["--steps", str(steps), "--shapes", *shapes, "--lengths", *map(str, lengths)]
    return command, attn


def check_step_costs(
    device: str = "cuda",
    lengths: tuple[int, ...] = (4096, 8192),
    shapes: tuple[str, ...] = ("7b-slice",),
    steps: int = 2,
    timeout: float | None = None,
) -> CheckResult:
    """Step time and peak memory of plain TRL SFT, SafeKey (TRL's Triton head and the tiled one) and the reference's
    way, and full-logits SFT beside TRL's fused head, on DeepSeek-R1-Distill-Qwen-7B's widths cut to 2 layers, in
    bf16 with flash-attention 2 where it is installed (sdpa otherwise, reported as a skipped part)."""
    command, attn = bench_command(device, lengths, shapes, steps)
    skipped = (
        [] if attn == "flash_attention_2" else ["flash_attention_2: `flash_attn` is not installed; measured with sdpa"]
    )
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    shown = " ".join(["python", "bench/bench_safekey.py", *command[2:]])
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return CheckResult("step time and memory", "error", last, skipped=skipped)
    return CheckResult(
        "step time and memory",
        "pass",
        f"measured ({attn}, {', '.join(shapes)}); tables below",
        output=f"`{shown}`:\n\n{completed.stdout}",
        skipped=skipped,
    )


@dataclass
class MemoryVerdict:
    """A measured peak against a GPU's memory and against the plan."""

    planned: float  # bytes, `--dry_run`'s total
    allocated: float  # bytes, torch's peak of allocated tensors
    reserved: float  # bytes, torch's peak of memory held by its allocator
    context: float  # bytes in use on the GPU beside the allocator's (the CUDA context, and anything else running)
    limit: float = FITS_24GB

    @property
    def peak(self) -> float:
        return self.reserved + self.context

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit

    @property
    def plan_holds(self) -> bool:
        return self.planned >= PLAN_MIN_SHARE * self.allocated

    def __str__(self) -> str:
        fits = "fits" if self.fits else "does not fit"
        plan = "" if self.plan_holds else f" (the plan says less than {PLAN_MIN_SHARE:.0%} of the measured peak)"
        return (
            f"peak {self.peak / GIB:.2f} GiB ({self.reserved / GIB:.2f} reserved + {self.context / GIB:.2f} context; "
            f"{self.allocated / GIB:.2f} allocated) {fits} in {self.limit / GIB:.2f} GiB; the --dry_run plan said "
            f"{self.planned / GIB:.2f} GiB, {self.planned / max(self.allocated, 1):.2f} x the allocated peak{plan}"
        )


def long_rows(path: Path, tokens: int, rows: int = 2) -> Path:
    """Sample rows whose answers run on past `tokens` tokens of the tiny tokenizer (a real 8,192-token trace is
    mostly reasoning after K), written as SafeKey rows: U and K where they were."""
    from ..tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer("qwen2")
    lines = (sample_data_dir() / SAMPLE_FILE).read_text().splitlines()
    written = []
    for line in lines[:rows]:
        row = json.loads(line)
        filler = " The steps above are checked once more before the answer is final."
        per_filler = max(1, len(tokenizer(filler)["input_ids"]))
        row["response"] += filler * (tokens // per_filler + 1)
        written.append(json.dumps(row))
    path.write_text("\n".join(written) + "\n")
    return path


def _scratch_dir(needed_bytes: float) -> Path:
    """Shared memory when it has room (saving and reloading 15 GB goes faster there), else the temporary folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * needed_bytes:
        return Path(tempfile.mkdtemp(prefix="safekey-qlora-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="safekey-qlora-"))


def random_model_dir(folder: Path, config_fields: dict, device: str) -> Path:
    """A randomly initialised Qwen2 of `config_fields` in bf16, saved with the tiny tokenizer (its ids lie within any
    Qwen vocabulary), so that the recipe loads it with `from_pretrained` and bitsandbytes quantizes it on loading,
    as it would the real checkpoint."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from ..tiny import tiny_tokenizer

    path = folder / "model"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config_fields), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="50GB")
    tiny_tokenizer("qwen2").save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def check_qlora_memory(
    device: str = "cuda",
    max_length: int = 8192,
    config_fields: dict | None = None,
    steps: int = 2,
    limit: float = FITS_24GB,
) -> CheckResult:
    """The `qwen7b-qlora` recipe at `max_length` tokens, batch 1, on a random model of DeepSeek-R1-Distill-Qwen-7B's
    shape (saved and loaded through the recipe's own loader: nf4, double quantization, LoRA, gradient
    checkpointing): its peak GPU memory, CUDA context included, against a 24 GB GPU, and the `--dry_run` plan
    against the peak. `config_fields` replaces the 7B shape (a CPU test runs a small one)."""
    from ..plan import KNOWN_CONFIGS, plan_recipe
    from ..sft import parse_recipe, train

    fields = dict(config_fields or KNOWN_CONFIGS[REFERENCE_MODEL][1])
    fields.setdefault("max_position_embeddings", max(32768, max_length))
    work = _scratch_dir(2 * 7.7e9)
    try:
        model_dir = random_model_dir(work, fields, device)
        data = long_rows(work / "long.jsonl", max_length)
        overrides = [
            "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--max_length", str(max_length),
            "--max_steps", str(steps), "--gradient_accumulation_steps", "1", "--num_train_epochs", "1",
            "--auxiliary_epochs", "1", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
            "--output_dir", str(work / "run"), "--disable_tqdm", "true",
        ]  # fmt: skip
        if device == "cpu":
            overrides += ["--use_cpu", "true", "--bf16", "false"]
        plan = plan_recipe(QLORA_RECIPE, overrides)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = train(*parse_recipe(QLORA_RECIPE, overrides))
        logged = [entry for entry in trainer.state.log_history if "qmm_loss" in entry]
        if device != "cuda":
            return CheckResult(
                f"QLoRA 7B at {max_length:,} tokens",
                "pass" if logged else "fail",
                f"trained {steps} steps with SafeKey's terms on ({len(logged)} logged); plan {plan.total / GIB:.2f} "
                "GiB; no CUDA, no memory measured",
                measurements={"planned GiB": plan.total / GIB},
            )
        free, total = torch.cuda.mem_get_info()
        verdict = MemoryVerdict(
            planned=plan.total,
            allocated=torch.cuda.max_memory_allocated(),
            reserved=torch.cuda.max_memory_reserved(),
            context=max(0.0, (total - free) - torch.cuda.memory_reserved()),
            limit=limit,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = verdict.fits and verdict.plan_holds and bool(logged)
    parts = {
        "weights": plan.weights,
        "activations": plan.activations,
        "query-masked pass": plan.query_masked_pass,
        "LM-head buffers": plan.lm_head_buffers,
    }
    planned = ", ".join(f"{name} {value / GIB:.2f}" for name, value in parts.items())
    return CheckResult(
        f"QLoRA 7B at {max_length:,} tokens",
        "pass" if ok else "fail",
        f"{verdict}; plan, GiB: {planned}" + ("" if logged else "; SafeKey's terms did not run"),
        measurements={
            "peak GiB": verdict.peak / GIB,
            "allocated GiB": verdict.allocated / GIB,
            "reserved GiB": verdict.reserved / GIB,
            "context GiB": verdict.context / GIB,
            "planned GiB": verdict.planned / GIB,
        },
    )
