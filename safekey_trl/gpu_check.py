"""`make gpu-check`: what only a CUDA machine can check, in one command of under ten minutes.

Each check is a function returning a [`CheckResult`]; [`run_checks`] runs each in its own process under a time budget
(a crash, an out-of-memory error or a hang in one leaves the others running), prints a table, and on CUDA writes it
with the date and the device to `docs/gpu.md`. Without CUDA every check that needs it is reported as skipped, with
the reason, and the command exits 0.

    python -m safekey_trl.gpu_check                       # every check, default budgets
    python -m safekey_trl.gpu_check --only lm_head qlora  # some of them
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import multiprocessing
import os
import queue
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "gpu.md"
BENCH = ROOT / "bench" / "bench_safekey.py"

# (rtol, atol) within which two computations of the same quantity agree, by the dtype they ran in
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2)}


@dataclass
class CheckResult:
    """What one check found: `status` is pass, fail, skip, error or timeout; `detail` says why or what was seen."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    measurements: dict[str, float] = field(default_factory=dict)
    output: str = ""  # long text to append to the report (the benchmark's tables)


@dataclass
class Comparison:
    """The largest difference between two tensors, and the one their dtype's tolerance allows there."""

    label: str
    max_difference: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.max_difference <= self.allowed

    def __str__(self) -> str:
        return f"{self.label}: {self.max_difference:.2e} (allowed {self.allowed:.2e})"


def compare(label: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """`got` against `expected` elementwise: |got − expected| ≤ atol + rtol·|expected|, as `torch.testing` does.

    Reports the largest difference and the tolerance allowed at that element's place (the tightest, if none
    fails: so the margin shows)."""
    rtol, atol = TOLERANCES[dtype]
    expected = expected.detach().float()
    got = got.detach().float().to(expected.device)
    if got.shape != expected.shape:
        return Comparison(f"{label} (shapes {tuple(got.shape)} vs {tuple(expected.shape)})", float("inf"), 0.0)
    if not expected.numel():
        return Comparison(label, 0.0, atol)
    difference = (got - expected).abs()
    allowed = atol + rtol * expected.abs()
    worst = int((difference - allowed).flatten().argmax())
    return Comparison(label, float(difference.flatten()[worst]), float(allowed.flatten()[worst]))


def result_from_comparisons(name: str, comparisons: list[Comparison], extra: str = "") -> CheckResult:
    """Pass when every comparison holds; the detail names the failing ones (or the largest margin used)."""
    failing = [c for c in comparisons if not c.ok]
    shown = failing or sorted(comparisons, key=lambda c: c.max_difference / max(c.allowed, 1e-30))[-2:]
    detail = "; ".join(str(c) for c in shown) + (f"; {extra}" if extra else "")
    return CheckResult(
        name,
        "fail" if failing else "pass",
        detail,
        measurements={c.label: c.max_difference for c in comparisons},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Models


def _qwen2(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, attn: str, dtype, device
):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


# The tiny model, and one layer of DeepSeek-R1-Distill-Qwen-7B's shape
ATTENTION_SHAPES = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=1024, length=96),
    "7b-layer": dict(hidden=3584, intermediate=18944, layers=1, heads=28, kv_heads=4, vocab=152064, length=2048),
}


def _available_attention(device: torch.device) -> list[str]:
    implementations = ["eager", "sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        implementations.append("flash_attention_2")
    return implementations


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def check_query_mask_attention(
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    shape: str = "tiny",
    implementations: list[str] | None = None,
) -> CheckResult:
    """L_QMM under each attention implementation with SafeKey's query mask (0 on the prompt, after a visible
    prefix): the loss on K and the logits after the query agree with eager attention in float32 within `dtype`'s
    tolerance; the logits after the query do not move when the query's tokens change (and do when it is visible,
    so that the check can fail)."""
    device = torch.device(device)
    sizes = dict(ATTENTION_SHAPES[shape])
    length = sizes.pop("length")
    implementations = implementations or _available_attention(device)
    batch = 2
    prefix, query_end = length // 16, length // 4  # the query is hidden from `prefix` (a system prompt) on
    key_start, key_end = length // 3, length // 3 + length // 16
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, sizes["vocab"], (batch, length), generator=generator)
    changed = input_ids.clone()
    changed[:, prefix:query_end] = torch.randint(10, sizes["vocab"], (batch, query_end - prefix), generator=generator)
    query_mask = torch.ones_like(input_ids)
    query_mask[:, prefix:query_end] = 0
    after_query = slice(query_end, None)

    float32_model = _qwen2(**sizes, attn="eager", dtype=torch.float32, device=device)
    models = {torch.float32: float32_model}
    if dtype != torch.float32:
        models[dtype] = copy.deepcopy(float32_model).to(dtype)

    def run(attn: str, run_dtype: torch.dtype, ids: torch.Tensor, mask: torch.Tensor):
        model = models[run_dtype]
        model.set_attn_implementation(attn)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = ids[:, key_start + 1 : key_end + 1].to(device)
        loss = F.cross_entropy(logits[:, key_start:key_end].flatten(0, 1), targets.flatten())
        return loss, logits[:, after_query]

    reference_loss, reference_logits = run("eager", torch.float32, input_ids, query_mask)
    comparisons = []
    for attn in implementations:
        loss, logits = run(attn, dtype, input_ids, query_mask)
        _, changed_logits = run(attn, dtype, changed, query_mask)
        comparisons += [
            compare(f"{attn} L_QMM vs eager float32", loss, reference_loss, dtype),
            compare(f"{attn} logits after the query vs eager float32", logits, reference_logits, dtype),
            compare(f"{attn} logits after the query, query changed", changed_logits, logits, dtype),
        ]
    # Without the mask the query's tokens must move the logits after it: else the invariance proves nothing
    _, visible = run(implementations[0], dtype, input_ids, torch.ones_like(input_ids))
    _, visible_changed = run(implementations[0], dtype, changed, torch.ones_like(input_ids))
    sensitivity = compare("query visible, query changed", visible_changed, visible, dtype)
    result = result_from_comparisons(
        f"query mask, {shape}", comparisons, f"{', '.join(implementations)} in {str(dtype).split('.')[-1]}"
    )
    result.measurements[sensitivity.label] = sensitivity.max_difference
    if sensitivity.ok:
        result.status = "fail"
        result.detail = f"vacuous: changing a visible query did not move the logits ({sensitivity}); " + result.detail
    return result


def check_lm_head_kernels(
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    tokens: int = 5000,
    vocab: int = 40000,
    hidden: int = 256,
) -> CheckResult:
    """TRL's fused LM head (its Triton kernel on CUDA), SafeKey's tiled kernel and the full logits: the same loss
    and the same gradient for every parameter, through the model's forward. The defaults cross TRL's tile edges
    (4,096 tokens, 32,768 vocabulary entries)."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from .lm_head import add_tiled_lm_head

    device = torch.device(device)
    model = _qwen2(hidden, 2 * hidden, 1, 4, 2, vocab, "sdpa", torch.float32, device).train()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (1, tokens), generator=generator).to(device)
    labels = input_ids.clone()
    labels[:, : tokens // 10] = -100
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def loss_and_grads(candidate, fused: bool):
        with autocast:
            if fused:
                loss = candidate(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
            else:
                logits = candidate(input_ids=input_ids).logits.float()
                loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in candidate.named_parameters()}

    full_loss, full_grads = loss_and_grads(copy.deepcopy(model), fused=False)
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "is_top1"))
    tiled_model = copy.deepcopy(trl_model)
    add_tiled_lm_head(tiled_model, always=True)
    comparisons = []
    for name, candidate in (("TRL fused", trl_model), ("tiled", tiled_model)):
        loss, grads = loss_and_grads(candidate, fused=True)
        comparisons.append(compare(f"{name} loss vs full logits", loss, full_loss, dtype))
        for parameter in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
            comparisons.append(compare(f"{name} {parameter} grad", grads[parameter], full_grads[parameter], dtype))
    kernel = "Triton" if device.type == "cuda" else "torch fallback"
    return result_from_comparisons("LM-head kernels", comparisons, f"TRL's {kernel}, {tokens} tokens x {vocab} vocab")


def check_qlora_step(device: str = "cuda", steps: int = 3) -> CheckResult:
    """A QLoRA run with bitsandbytes nf4: the LoRA weights and the safety head change, the 4-bit weights do not."""
    from trl import ModelConfig

    from .data import load_safekey_dataset
    from .modeling import load_model_and_tokenizer, lora_config
    from .trainer import SafeKeySFTTrainer

    model_args = ModelConfig(
        model_name_or_path="tiny:qwen2",
        dtype="bfloat16",
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        attn_implementation="sdpa",
    )
    model, tokenizer = load_model_and_tokenizer(model_args)
    dataset, _, _ = load_safekey_dataset(str(ROOT / "data" / "safekey_sample.jsonl"), tokenizer, 256)
    args = _check_config(tempfile.mkdtemp(), max_steps=steps, bf16=True)
    trainer = SafeKeySFTTrainer(
        model, args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(model_args)
    )

    def snapshot(predicate) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if predicate(n, p)}

    four_bit = snapshot(lambda n, p: p.dtype == torch.uint8)
    lora = snapshot(lambda n, p: "lora_" in n)
    head = {n: p.detach().clone() for n, p in trainer.safety_head.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved_lora = sum(not torch.equal(after[n], lora[n]) for n in lora)
    moved_four_bit = sum(not torch.equal(after[n], four_bit[n]) for n in four_bit)
    moved_head = sum(not torch.equal(p, head[n]) for n, p in trainer.safety_head.named_parameters())
    ok = four_bit and lora and moved_lora == len(lora) and moved_four_bit == 0 and moved_head == len(head)
    return CheckResult(
        "QLoRA nf4 step",
        "pass" if ok else "fail",
        f"{moved_lora}/{len(lora)} LoRA tensors moved, {moved_head}/{len(head)} head tensors moved, "
        f"{moved_four_bit}/{len(four_bit)} 4-bit tensors moved after {steps} steps",
    )


def check_zero3(device: str = "cuda") -> CheckResult:
    """A one-process DeepSpeed ZeRO-3 run: trains, saves, resumes to the same weights as a run without the break,
    and exports a clean model (no head weights; it loads with `AutoModelForCausalLM`) plus the head."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .data import load_safekey_dataset
    from .export import export
    from .tiny import build_tiny_model, load_tokenizer
    from .trainer import SafeKeySFTTrainer

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    zero3 = {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    tokenizer = load_tokenizer("tiny:qwen2")
    dataset, _, _ = load_safekey_dataset(str(ROOT / "data" / "safekey_sample.jsonl"), tokenizer, 256)
    work = Path(tempfile.mkdtemp())

    def run(output_dir: Path, resume: Path | None = None) -> SafeKeySFTTrainer:
        args = _check_config(str(output_dir), max_steps=4, save_strategy="steps", save_steps=2, deepspeed=zero3)
        trainer = SafeKeySFTTrainer(
            build_tiny_model(tokenizer, "qwen2"), args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_model(str(output_dir))
        return trainer

    first = run(work / "straight")
    losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    run(work / "resumed", resume=work / "straight" / "checkpoint-2")
    comparisons = []
    for file in ("model.safetensors", "safekey_head.safetensors"):
        straight, resumed = load_file(str(work / "straight" / file)), load_file(str(work / "resumed" / file))
        for key, value in straight.items():
            comparisons.append(compare(f"{file}:{key}", resumed[key], value, torch.float32))
    exported = Path(export(work / "straight", work / "export"))
    model_keys = load_file(str(exported / "model.safetensors")).keys()
    clean = not any("safekey" in key for key in model_keys) and (exported / "safekey_head.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(exported)
    result = result_from_comparisons(
        "DeepSpeed ZeRO-3, one process", comparisons, f"losses {', '.join(f'{x:.3f}' for x in losses)}"
    )
    if not clean:
        result.status, result.detail = "fail", "the exported model holds head weights; " + result.detail
    if not (len(losses) >= 2 and losses[-1] < losses[0]):
        result.status, result.detail = "fail", "the loss did not fall; " + result.detail
    return result


def check_step_costs(
    device: str = "cuda", lengths: tuple[int, ...] = (4096, 8192), timeout: float = 140
) -> CheckResult:
    """Step time and peak memory of plain TRL SFT, SafeKey and the reference's way (`bench/bench_safekey.py`) in
    bf16 with flash-attention 2 where it is installed."""
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    command = [
        sys.executable,
        str(BENCH),
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
        "--attn",
        attn,
        "--steps",
        "2",
        "--lengths",
        *map(str, lengths),
    ]
    try:
        # Its own timeout, inside the check's budget: the benchmark is a process of its own
        completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return CheckResult("step time and memory", "timeout", f"the benchmark ran past {timeout:.0f} s")
    if completed.returncode != 0:
        return CheckResult("step time and memory", "error", completed.stderr.strip().splitlines()[-1][:300])
    return CheckResult(
        "step time and memory",
        "pass",
        f"measured ({attn}); tables below",
        output=f"`{' '.join(['python', 'bench/bench_safekey.py', *command[2:]])}`:\n\n{completed.stdout}",
    )


def _check_config(output_dir: str, **overrides):
    from .config import SafeKeyConfig

    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        auxiliary_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        seed=7,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return SafeKeyConfig(**settings)


# ---------------------------------------------------------------------------------------------------------------------
# Running


def _needs_cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _needs(module: str, extra: str) -> Callable[[], str | None]:
    def requirement() -> str | None:
        missing_cuda = _needs_cuda()
        if missing_cuda:
            return missing_cuda
        if importlib.util.find_spec(module) is None:
            return f"`{module}` is not installed (pip install 'safekey-trl[{extra}]')"
        return None

    return requirement


def _needs_bench() -> str | None:
    return _needs_cuda() or (None if BENCH.is_file() else f"no {BENCH.relative_to(ROOT)} in this checkout")


@dataclass
class Check:
    """A check to run: its function and keyword arguments, what it needs (a function giving the reason it cannot
    run, or None), and its time budget in seconds."""

    name: str
    function: Callable[..., CheckResult]
    budget: float
    requires: Callable[[], str | None] = _needs_cuda
    kwargs: dict = field(default_factory=dict)


CHECKS = [
    Check("query_mask_tiny", check_query_mask_attention, 60, kwargs=dict(shape="tiny")),
    Check("query_mask_7b_layer", check_query_mask_attention, 90, kwargs=dict(shape="7b-layer")),
    Check("lm_head", check_lm_head_kernels, 60),
    Check("qlora", check_qlora_step, 90, requires=_needs("bitsandbytes", "dev")),
    Check("zero3", check_zero3, 150, requires=_needs("deepspeed", "deepspeed")),
    Check("step_costs", check_step_costs, 150, requires=_needs_bench, kwargs=dict(timeout=140)),
]


def _run_in_child(function: Callable[..., CheckResult], kwargs: dict, results: multiprocessing.Queue) -> None:
    try:
        results.put(function(**kwargs))
    except BaseException as error:  # noqa: BLE001 - the parent reports anything, and goes on
        last = traceback.format_exception(error)[-1].strip()
        results.put(CheckResult("", "error", f"{type(error).__name__}: {last[:400]}"))


def run_check(check: Check, budget_scale: float = 1.0, start_method: str = "spawn") -> CheckResult:
    """Run one check in a fresh process under its time budget: a result, a timeout, or the error it died of.
    `spawn` by default: a forked process must not use CUDA after its parent touched it."""
    reason = check.requires()
    if reason is not None:
        return CheckResult(check.name, "skip", reason)
    context = multiprocessing.get_context(start_method)
    results = context.Queue()
    process = context.Process(target=_run_in_child, args=(check.function, check.kwargs, results), daemon=True)
    start = time.monotonic()
    budget = check.budget * budget_scale
    process.start()
    result = None
    # Wait for a result until the budget runs out, or until the process dies without one
    while result is None and time.monotonic() - start < budget:
        try:
            result = results.get(timeout=0.5)
        except queue.Empty:
            if not process.is_alive():
                try:
                    result = results.get(timeout=1)  # sent just before it ended
                except queue.Empty:
                    break
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()
    seconds = time.monotonic() - start
    if result is None:
        if process.exitcode not in (None, 0, -9):
            result = CheckResult(check.name, "error", f"the check's process died (exit code {process.exitcode})")
        else:
            result = CheckResult(check.name, "timeout", f"stopped after its budget of {budget:.0f} s")
    result.name, result.seconds = check.name, seconds
    return result


def run_checks(
    checks: list[Check],
    budget_scale: float = 1.0,
    echo: Callable[[str], None] = print,
    start_method: str = "spawn",
) -> list[CheckResult]:
    """Every check in turn, whatever the previous ones gave."""
    results = []
    for check in checks:
        result = run_check(check, budget_scale, start_method)
        echo(f"{result.name}: {result.status} ({result.seconds:.0f} s) {result.detail}")
        results.append(result)
    return results


def render_table(results: list[CheckResult]) -> str:
    """The results as a Markdown table."""
    lines = ["| check | result | seconds | detail |", "|---|---|---|---|"]
    for result in results:
        detail = result.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {result.name} | {result.status} | {result.seconds:.0f} | {detail} |")
    return "\n".join(lines)


def write_report(path: Path, results: list[CheckResult], device: str, when: datetime.datetime) -> None:
    """`docs/gpu.md`: the date, the device and software, the table, and any long output (the benchmark's tables)."""
    import transformers
    import trl

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    parts = [
        "# GPU checks",
        "",
        f"`make gpu-check` on {when:%Y-%m-%d %H:%M} UTC. Device: {device}; {versions}.",
        "",
        render_table(results),
        "",
    ]
    for result in results:
        if result.output:
            parts += [f"## {result.name}", "", result.output.strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[check.name for check in CHECKS], help="run only these checks")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every check's time budget")
    parser.add_argument("--report", type=Path, default=REPORT, help="where to write the table (CUDA runs only)")
    args = parser.parse_args(argv)
    checks = [check for check in CHECKS if not args.only or check.name in args.only]
    results = run_checks(checks, args.budget_scale)
    print()
    print(render_table(results))
    if not torch.cuda.is_available():
        print(f"\nno CUDA device: nothing ran, {args.report} left as it is")
        return 0
    write_report(args.report, results, torch.cuda.get_device_name(), datetime.datetime.now(datetime.UTC))
    print(f"\nwrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
