"""The LM term's head: TRL's fused LM head (its Triton kernel on CUDA) and SafeKey's tiled kernel against the full
logits, in the loss and in every parameter's gradient, with gradients compared relative to their size; and the three
timed on the 7B model's LM head alone."""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from .. import lm_head
from .attention import qwen2_model
from .results import CheckResult, compare, compare_relative, result_from_comparisons

# Adding one vector to every key shifts all of a query's scores equally, which softmax ignores: the key bias's exact
# gradient is zero, and what a kernel returns for it is rounding noise with no size to compare against
ZERO_GRADIENT_PARAMETERS = ("k_proj.bias",)
# DeepSeek-R1-Distill-Qwen-7B's LM head at the paper's 8,192 tokens: (tokens, hidden, vocab)
SEVEN_B_HEAD = (8192, 3584, 152064)


def _with_head(model, kernel: str):
    """A copy of `model` whose `fused_lm_head=True` forward runs `kernel` ("trl" or "tiled"), or the copy as it is
    ("full": the caller builds the full logits). The fused head is added after copying: its patched forward holds
    the model it was added to."""
    from trl.trainer.utils import add_fused_lm_head

    candidate = copy.deepcopy(model)
    if kernel != "full":
        add_fused_lm_head(candidate, outputs=("log_probs", "entropy", "is_top1"))
    if kernel == "tiled":
        lm_head.add_tiled_lm_head(candidate, always=True)
    return candidate


def _loss(candidate, kernel: str, input_ids: torch.Tensor, labels: torch.Tensor, autocast) -> torch.Tensor:
    with autocast:
        if kernel != "full":
            return candidate(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
        logits = candidate(input_ids=input_ids).logits.float()
        return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)


def _head_step(candidate, kernel: str, input_ids: torch.Tensor, autocast):
    def step() -> None:
        _loss(candidate, kernel, input_ids, input_ids, autocast).backward()
        candidate.lm_head.weight.grad = None

    return step


def time_lm_head_alone(
    device: torch.device, dtype: torch.dtype, tokens: int, hidden: int, vocab: int, steps: int = 3
) -> dict[str, tuple[float, float]]:
    """Forward and backward of the LM head alone (everything below it frozen, so the backward stops at it) for each
    kernel: the median step time (ms) over `steps` after a warm-up, and the peak memory growth (MiB) over one step
    (CUDA only; 0 elsewhere)."""
    base = qwen2_model(hidden, 128, 1, hidden // 128 or 1, 1, vocab, device).train()
    base.set_attn_implementation("sdpa")
    for name, parameter in base.named_parameters():
        parameter.requires_grad_(name == "lm_head.weight")
    input_ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(2)).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    found = {}
    for kernel in ("trl", "tiled", "full"):
        candidate = _with_head(base, kernel)
        step = _head_step(candidate, kernel, input_ids, autocast)
        step()  # warm-up: kernels compiled, workspaces allocated
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        memory = 0.0
        if device.type == "cuda":
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            memory = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        found[kernel] = (1000 * statistics.median(times), memory)
        del candidate, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return found


def check_lm_head_kernels(
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    tokens: int = 5000,
    vocab: int = 40000,
    hidden: int = 256,
    timing: tuple[int, int, int] | None = SEVEN_B_HEAD,
) -> CheckResult:
    """TRL's fused LM head (its Triton kernel on CUDA), SafeKey's tiled kernel and the full logits, through the
    model's forward: the same loss, and for every parameter a gradient within the dtype's relative tolerance of the
    full logits' (a zeroed or halved gradient fails). The defaults cross TRL's tile edges (4,096 tokens, 32,768
    vocabulary entries). The key projection's bias, whose exact gradient is zero, is left out. Then, if `timing` is
    given, each kernel is timed on an LM head of that (tokens, hidden, vocab)."""
    device = torch.device(device)
    model = qwen2_model(hidden, 2 * hidden, 1, 4, 2, vocab, device).train()
    model.set_attn_implementation("sdpa")
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (1, tokens), generator=generator).to(device)
    labels = input_ids.clone()
    labels[:, : tokens // 10] = -100
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def loss_and_grads(kernel: str):
        candidate = _with_head(model, kernel)
        loss = _loss(candidate, kernel, input_ids, labels, autocast)
        loss.backward()
        grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in candidate.named_parameters()}
        return loss.detach(), grads

    full_loss, full_grads = loss_and_grads("full")
    comparisons = []
    for kernel, label in (("trl", "TRL fused"), ("tiled", "tiled")):
        loss, grads = loss_and_grads(kernel)
        comparisons.append(compare(f"{label} loss vs full logits", loss, full_loss, dtype))
        for parameter, expected in full_grads.items():
            if parameter.endswith(ZERO_GRADIENT_PARAMETERS):
                continue
            got = grads[parameter] if grads[parameter] is not None else torch.zeros_like(expected)
            comparisons.append(compare_relative(f"{label} {parameter} grad", got, expected, dtype))
    name = "Triton" if lm_head.triton_runs_on(device) else "torch fallback"
    result = result_from_comparisons(
        "LM-head kernels", comparisons, f"TRL's {name}, {tokens} tokens x {vocab} vocab, {str(dtype).split('.')[-1]}"
    )
    if timing is not None:
        timed = time_lm_head_alone(device, dtype, *timing)
        shown = ", ".join(f"{kernel} {ms:.1f} ms / {mib:.0f} MiB" for kernel, (ms, mib) in timed.items())
        result.detail += f"; LM head alone, {timing[0]} tokens x {timing[1]} -> {timing[2]:,}: {shown}"
        for kernel, (ms, mib) in timed.items():
            result.measurements[f"{kernel} head ms"] = ms
            result.measurements[f"{kernel} head peak MiB"] = mib
    return result
