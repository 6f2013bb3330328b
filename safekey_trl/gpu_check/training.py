"""Training the way recipes train, in bf16: a QLoRA step, and DeepSpeed ZeRO-3 through `safekey-trl train
--accelerate zero3` (save, resume, export)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..resources import sample_data_dir
from .attention import SAMPLE_FILE
from .results import CheckResult, compare_relative, loss_fell, result_from_comparisons

CLI = [sys.executable, "-m", "safekey_trl"]
# The fixed batch a training check overfits: every step sees these rows, so the loss falls steadily
FIXED_BATCH_ROWS = 8


def fixed_batch_data(folder: Path, rows: int = FIXED_BATCH_ROWS) -> Path:
    """The first `rows` rows of the sample data, in a file of their own."""
    path = folder / "fixed_batch.jsonl"
    lines = (sample_data_dir() / SAMPLE_FILE).read_text().splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def fixed_batch_arguments(
    data: Path, output_dir: Path, steps: int, processes: int, device: str, bf16: bool = True
) -> list[str]:
    """`safekey-trl train --recipe tiny` overrides that overfit one batch in bf16 as the paper's recipes run (bf16
    weights, bf16 autocast), the auxiliary terms on from the first step: the whole of `data` is one global batch,
    split over `processes`, at a constant learning rate. `bf16=False`: float32 throughout, to tell a precision
    problem from others."""
    return [
        "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(FIXED_BATCH_ROWS // processes),
        "--max_steps", str(steps), "--num_train_epochs", "1", "--auxiliary_epochs", str(steps),
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--dtype", "bfloat16" if bf16 else "float32", "--bf16", str(bf16).lower(),
        "--use_cpu", str(device == "cpu").lower(),
        "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none",
    ]  # fmt: skip


def logged_losses(trainer_state: Path, key: str = "loss") -> list[float]:
    """The per-step values of `key` in a checkpoint's `trainer_state.json`."""
    history = json.loads(trainer_state.read_text())["log_history"]
    return [entry[key] for entry in history if key in entry and "train_runtime" not in entry]


def _launch(arguments: list[str], timeout: float | None) -> str | None:
    """Run `safekey-trl train`; None, or the last error lines of its output when it failed. Its processes stay in
    the check's process group, which the runner ends with the check."""
    environment = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [*CLI, "train", "--recipe", "tiny", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )
    if completed.returncode == 0:
        return None
    return launch_failure(completed.stderr + completed.stdout) or f"exit code {completed.returncode}"


def launch_failure(output: str) -> str:
    """The exception a failed launch died of, with the source line that raised it, from its (rich) traceback: the
    launcher's own summary (`ChildFailedError`) says only that a rank failed."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in output.splitlines()]
    for index in range(len(lines) - 1, -1, -1):
        if re.match(r"\w+(Error|Exception)\b", lines[index]) and not lines[index].startswith("ChildFailedError"):
            raised = next((line for line in reversed(lines[:index]) if "❱" in line), "")
            source = raised.split("❱", 1)[1].strip(" │") if raised else ""
            return lines[index].strip() + (f" at `{' '.join(source.split())}`" if source else "")
    return ""


def check_zero3(
    device: str = "cuda",
    steps: int = 6,
    processes: int | None = None,
    timeout: float | None = None,
    bf16: bool = True,
) -> CheckResult:
    """DeepSpeed ZeRO-3 the way a recipe runs it: `safekey-trl train --accelerate zero3` in bf16 (2 processes where
    there are 2 GPUs, else 1), overfitting one batch with the auxiliary terms on. Checks that the loss falls (means
    of the first and last two steps, `loss_fell`), that a run resumed from its middle checkpoint ends where the
    straight run does (the weight updates within bf16's relative tolerance), and that the exported model is clean
    (no head weights; it loads with `AutoModelForCausalLM`) with the head beside it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ..export import export
    from ..tiny import materialize_tiny

    if processes is None:
        processes = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    work = Path(tempfile.mkdtemp(prefix="safekey-zero3-"))
    data = fixed_batch_data(work)
    middle = steps // 2
    launch = ["--accelerate", "zero3", "--num_processes", str(processes)]
    saving = ["--save_strategy", "steps", "--save_steps", str(middle)]
    straight = [*fixed_batch_arguments(data, work / "straight", steps, processes, device, bf16), *saving, *launch]
    failure = _launch(straight, timeout)
    if failure:
        return CheckResult("DeepSpeed ZeRO-3", "fail", f"the run failed: {failure}")
    resumed = [*fixed_batch_arguments(data, work / "resumed", steps, processes, device, bf16), *saving, *launch]
    failure = _launch([*resumed, "--resume_from_checkpoint", str(work / "straight" / f"checkpoint-{middle}")], timeout)
    if failure:
        return CheckResult("DeepSpeed ZeRO-3", "fail", f"the resumed run failed: {failure}")

    losses = logged_losses(work / "straight" / f"checkpoint-{steps}" / "trainer_state.json")
    fell, fall = loss_fell(losses)
    initial = load_file(str(materialize_tiny("tiny:qwen2") / "model.safetensors"))
    comparisons = []
    straight_model = load_file(str(work / "straight" / "model.safetensors"))
    resumed_model = load_file(str(work / "resumed" / "model.safetensors"))
    for key, value in straight_model.items():
        start = initial[key].float()
        # What training changed, compared relative to its own size: a lost step or optimizer state shows
        label = f"update of {key}, resumed vs straight"
        comparisons.append(
            compare_relative(label, resumed_model[key].float() - start, value.float() - start, torch.bfloat16, 5e-2)
        )
    straight_head = load_file(str(work / "straight" / "safekey_head.safetensors"))
    resumed_head = load_file(str(work / "resumed" / "safekey_head.safetensors"))
    for key, value in straight_head.items():
        label = f"head {key}, resumed vs straight"
        comparisons.append(compare_relative(label, resumed_head[key], value, torch.bfloat16, 1e-2))
    precision = "bf16" if bf16 else "float32"
    exported = Path(export(work / "straight", work / "export"))
    clean = not any("safekey" in key for key in load_file(str(exported / "model.safetensors")))
    has_head = (exported / "safekey_head.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(exported)
    result = result_from_comparisons(
        "DeepSpeed ZeRO-3",
        comparisons,
        f"{processes} process(es), {precision}; {fall}; losses {', '.join(f'{x:.3f}' for x in losses)}",
    )
    if not (clean and has_head):
        result.status = "fail"
        result.detail = "the export holds head weights or lacks the head file; " + result.detail
    if not fell:
        result.status = "fail"
    return result


def check_qlora_step(device: str = "cuda", steps: int = 3) -> CheckResult:
    """A QLoRA run as the QLoRA recipes set it (bitsandbytes nf4 with double quantization, bf16 compute and
    autocast): the LoRA weights and the safety head change, the 4-bit weights do not."""
    from trl import ModelConfig

    from ..config import SafeKeyConfig
    from ..data import load_safekey_dataset
    from ..modeling import load_model_and_tokenizer, lora_config
    from ..trainer import SafeKeySFTTrainer

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
    dataset, _, _ = load_safekey_dataset(str(sample_data_dir() / SAMPLE_FILE), tokenizer, 256)
    args = SafeKeyConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        auxiliary_epochs=1,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=True,
        use_cpu=device == "cpu",
        seed=7,
        disable_tqdm=True,
    )
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
        f"{moved_four_bit}/{len(four_bit)} 4-bit tensors moved after {steps} bf16 steps",
    )
