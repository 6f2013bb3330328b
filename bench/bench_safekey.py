"""What SafeKey costs over plain SFT: step time and peak memory, against TRL's SFTTrainer and the paper's way.

Runs, in one process and on the same batches:
  1. plain SFT: TRL's `SFTTrainer` training steps (the floor the issue sets),
  2. SafeKey: `SafeKeySFTTrainer` (last hidden state only, a short query-masked pass scoring K only), once with each
     LM-head kernel: `lm_head_kernel="trl"` (TRL's fused LM head) and `"tiled"` (SafeKey's kernel); the default,
     `"auto"`, is the first where Triton runs and the second elsewhere, and the SafeKey ratios use the default,
  3. reference: a SafeKey step mirroring the paper's computation: every hidden state, the full logits for the LM loss,
     and a second full-length forward building the full logits again to score K,
  4. full-logits SFT, for context: plain SFT with the model's own loss on the full logits (no fused head),
  5. plain SFT through the tiled kernel (`SafeKeySFTTrainer`, both auxiliary weights 0): with (1), it shows SafeKey's
     own overhead with either LM-head kernel held fixed.

Model shapes, all Qwen2 (`--shapes`; the first two by default):
  - `7b-share`: the LM head takes the same share of a forward's multiply-adds at 4,096 tokens as in
    DeepSeek-R1-Distill-Qwen-7B (about 7%), with Qwen's MLP and grouped-query proportions; small enough for a
    4,096-token step on 2 CPU cores. Its ratios are what SafeKey costs in a real run (up to the attention share, which
    a narrow model at long sequences inflates: the FLOP table shows it).
  - `head-heavy`: Qwen's 152,064-token vocabulary against hidden size 128, 2 layers: the LM head is ~96% of the work,
    so its ratios are those of LM-head kernels.
  - `7b-slice` (for a GPU): DeepSeek-R1-Distill-Qwen-7B's widths, heads and vocabulary with 2 of its 28 layers. On
    CUDA the methods run one at a time, each model freed before the next is built.
U+K end near 12% of each sequence, as in real traces. Peak memory is the growth of the process's peak resident set
over the step (CPU; the high-water mark is reset before each step) or `torch.cuda.max_memory_allocated` growth (GPU).
Next to the measured ratios, the ones a FLOP count expects (`safekey_trl.plan`).

    python bench/bench_safekey.py                       # CPU, both shapes, lengths 1024 2048 4096
    python bench/bench_safekey.py --device cuda --dtype bfloat16 --attn flash_attention_2 --shapes 7b-slice \
        --lengths 4096 8192
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from safekey_trl import DualPathSafetyHead, SafeKeyConfig, SafeKeySFTTrainer  # noqa: E402
from safekey_trl.lm_head import triton_runs_on  # noqa: E402
from safekey_trl.losses import safety_head_loss, span_mask  # noqa: E402
from safekey_trl.plan import KNOWN_CONFIGS, ModelShape, training_step_macs  # noqa: E402
from safekey_trl.tiny import build_tiny_tokenizer  # noqa: E402

METHODS = (
    "plain SFT",
    "SafeKey, TRL head",
    "SafeKey, tiled head",
    "reference",
    "full-logits SFT",
    "plain SFT, tiled head",
)


# Where the benchmark's batches put K (`make_batch`): from 10% to 12.5% of the sequence
KEY_START_SHARE, KEY_END_SHARE = 0.10, 0.125
# The length at which `7b-share` matches the 7B model's LM-head share
SHARE_LENGTH = 4096
REFERENCE_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


def reference_shape() -> ModelShape:
    """DeepSeek-R1-Distill-Qwen-7B's shape (hidden 3584, MLP 18944, 28 layers, 28 heads / 4 KV heads, vocab 152064)."""
    model_type, fields = KNOWN_CONFIGS[REFERENCE_MODEL]
    return ModelShape.from_config(Qwen2Config(**fields))


def seven_b_share_shape(hidden: int = 384, layers: int = 2, head_dim: int = 64) -> ModelShape:
    """A narrow Qwen2 whose LM head has the 7B model's share of a forward at `SHARE_LENGTH` tokens: the MLP 5.29
    times the hidden size and 6 query heads per KV head as in Qwen (7 there), the vocabulary solved for the share."""
    qwen = reference_shape()
    heads = hidden // head_dim
    body = ModelShape(
        hidden=hidden,
        intermediate=round(hidden * qwen.intermediate / qwen.hidden / 16) * 16,
        layers=layers,
        heads=heads,
        kv_heads=1,
        vocab=0,
        head_dim=head_dim,
    )
    share = qwen.head_share(SHARE_LENGTH)
    # head / (body + head) = share, per token: vocab = share / (1 - share) · body / hidden
    body_per_token = body.forward_macs(SHARE_LENGTH, projected=0) / SHARE_LENGTH
    vocab = round(share / (1 - share) * body_per_token / hidden / 64) * 64
    return ModelShape(**{**body.__dict__, "vocab": vocab})


SHAPES: dict[str, Callable[[], ModelShape]] = {
    "7b-share": seven_b_share_shape,
    "head-heavy": lambda: ModelShape(
        hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=152064, head_dim=32
    ),
    # DeepSeek-R1-Distill-Qwen-7B itself, cut to 2 of its 28 layers: its widths, heads and vocabulary (a GPU shape)
    "7b-slice": lambda: ModelShape(**{**reference_shape().__dict__, "layers": 2}),
}
# What `make bench` measures by default, on a CPU
DEFAULT_SHAPES = ("7b-share", "head-heavy")


def make_batch(length: int, batch_size: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """A SafeKey batch: prompt to 4% of the sequence, U to 10%, K to 12.5%, then the rest of the trace and answer."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, vocab, (batch_size, length), generator=generator)
    prompt_end = int(0.04 * length)
    key_start, key_end = int(KEY_START_SHARE * length), int(KEY_END_SHARE * length)
    positions = torch.arange(length).expand(batch_size, length)
    labels = input_ids.masked_fill(positions < prompt_end, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "key_mask": ((positions >= key_start) & (positions < key_end)).long(),
        "query_mask": (positions >= prompt_end).long(),
        "understanding_span": torch.tensor([[prompt_end, key_start]] * batch_size),
        "prefix_end": torch.tensor([key_start] * batch_size),
        "unsafe": torch.tensor([float(i % 2) for i in range(batch_size)]),
    }


def make_model(shape: ModelShape, args: argparse.Namespace) -> torch.nn.Module:
    config = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max(args.lengths) + 1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # Built where it runs: initialising a 7B slice's 1.5 billion weights on a CPU takes longer than the benchmark
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(
            config, attn_implementation=args.attn, dtype=getattr(torch, args.dtype)
        )


def trainer_step(trainer: SFTTrainer, sft_only: bool) -> Callable[[dict], float]:
    trainer.create_optimizer()

    def step(batch: dict) -> float:
        if sft_only:
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        inputs = batch
        inputs = {k: v.to(trainer.args.device) for k, v in inputs.items()}
        num_items = trainer._get_num_items_in_batch([inputs], trainer.args.device)
        loss = trainer.training_step(trainer.model, dict(inputs), num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def full_logits_sft_step(model: torch.nn.Module, args: argparse.Namespace) -> Callable[[dict], float]:
    """Plain SFT through the model's own forward and loss: the full logits, no fused head."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch: dict) -> float:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with _autocast(args):
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _autocast(args: argparse.Namespace):
    return torch.autocast(args.device, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")


def reference_step(model: torch.nn.Module, args: argparse.Namespace) -> Callable[[dict], float]:
    """The paper's computation: all hidden states, full logits twice, a full-length second pass."""
    head = DualPathSafetyHead(model.config.hidden_size).to(args.device)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-5)

    def step(batch: dict) -> float:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with _autocast(args):
            outputs = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                output_hidden_states=True,
            )
            hidden = outputs.hidden_states[-1]
            length = hidden.shape[1]
            span = batch["understanding_span"]
            understanding_logits, prefix_logits = head(
                hidden,
                span_mask(span[:, 0], span[:, 1], length),
                span_mask(torch.zeros_like(batch["prefix_end"]), batch["prefix_end"], length),
            )
            head_loss = safety_head_loss(understanding_logits, prefix_logits, batch["unsafe"], 0.5).mean()
            masked = model(input_ids=batch["input_ids"], attention_mask=batch["query_mask"], output_hidden_states=True)
            key_labels = batch["input_ids"].masked_fill(batch["key_mask"] == 0, -100)
            qmm_loss = F.cross_entropy(
                masked.logits[:, :-1].flatten(0, 1).float(), key_labels[:, 1:].flatten(), ignore_index=-100
            )
            loss = outputs.loss + 0.2 * qmm_loss + 0.2 * head_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def time_steps(step: Callable[[dict], float], batch: dict, args: argparse.Namespace) -> float:
    """Median step time (s) over `args.steps` steps after a warm-up step."""
    step(batch)  # warm-up: optimizer states, kernels
    times = []
    for _ in range(args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fix_mmap_threshold() -> None:
    """Make glibc serve every large allocation with mmap, so that freed buffers leave the resident set at once and
    the resident set before a step is a fair baseline. Done after the timings: mmap's page faults slow every step."""
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def peak_memory(step: Callable[[dict], float], batch: dict, args: argparse.Namespace) -> float:
    """Peak memory growth (MiB) over one step."""
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    else:
        baseline = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak resident set (VmHWM)
        step(batch)
        peak = (_status_kib("VmHWM") - baseline) / 1024
    return peak


def build_step(method: str, shape: ModelShape, args: argparse.Namespace, output_dir: str) -> Callable[[dict], float]:
    """The step function of one method, on its own copy of the same initial model."""
    tokenizer = build_tiny_tokenizer()  # only its pad token is used: the batches are token ids already
    common = dict(
        per_device_train_batch_size=args.batch_size,
        report_to=[],
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        learning_rate=1e-5,
        disable_tqdm=True,
    )
    safekey_dummy = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3]],
            "labels": [[1, 2, 3]],
            "key_mask": [[0, 0, 1]],
            "query_mask": [[0, 1, 1]],
            "understanding_span": [[1, 2]],
            "prefix_end": [2],
            "unsafe": [1],
        }
    )

    def safekey_trainer(**overrides) -> SafeKeySFTTrainer:
        config = SafeKeyConfig(output_dir=output_dir, num_train_epochs=1, auxiliary_epochs=1, **common, **overrides)
        return SafeKeySFTTrainer(
            make_model(shape, args), config, train_dataset=safekey_dummy, processing_class=tokenizer
        )

    if method == "plain SFT":
        plain = SFTTrainer(
            make_model(shape, args),
            SFTConfig(output_dir=output_dir, **common),
            train_dataset=Dataset.from_dict({"input_ids": [[1, 2, 3]]}),
            processing_class=tokenizer,
        )
        return trainer_step(plain, sft_only=True)
    if method == "SafeKey, TRL head":
        return trainer_step(safekey_trainer(lm_head_kernel="trl"), sft_only=False)
    if method == "SafeKey, tiled head":
        return trainer_step(safekey_trainer(lm_head_kernel="tiled"), sft_only=False)
    if method == "reference":
        return reference_step(make_model(shape, args), args)
    if method == "full-logits SFT":
        return full_logits_sft_step(make_model(shape, args), args)
    if method == "plain SFT, tiled head":
        return trainer_step(safekey_trainer(lm_head_kernel="tiled", qmm_weight=0.0, head_weight=0.0), sft_only=False)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def measure_one_at_a_time(
    shapes: dict[str, ModelShape], batches: dict, args: argparse.Namespace, output_dir: str
) -> tuple[dict, dict]:
    """Time and memory of each method in turn, its model freed before the next is built (CUDA: a 7B slice's six
    models and optimizer states would not fit together)."""
    times, memory = {}, {}
    for name, shape in shapes.items():
        for method in METHODS:
            step = build_step(method, shape, args, output_dir)
            for length in args.lengths:
                times[name, length, method] = time_steps(step, batches[name, length], args)
                memory[name, length, method] = peak_memory(step, batches[name, length], args)
                print(
                    f"  {name}, {method} at {length}: {times[name, length, method]:.3f} s, "
                    f"{memory[name, length, method]:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            del step
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return times, memory


def measure_all_built(
    shapes: dict[str, ModelShape], batches: dict, args: argparse.Namespace, output_dir: str
) -> tuple[dict, dict]:
    """Every timing first, then every memory measurement (CPU: the latter changes glibc's allocator settings)."""
    steps, times = {}, {}
    for name, shape in shapes.items():
        steps[name] = {method: build_step(method, shape, args, output_dir) for method in METHODS}
        for length in args.lengths:
            for method in METHODS:
                times[name, length, method] = time_steps(steps[name][method], batches[name, length], args)
                print(
                    f"  timed {name}, {method} at {length}: {times[name, length, method]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    if args.device == "cpu":
        fix_mmap_threshold()
    memory = {
        (name, length, method): peak_memory(steps[name][method], batches[name, length], args)
        for name in shapes
        for length in args.lengths
        for method in METHODS
    }
    return times, memory


def expected_ratios(shape: ModelShape, length: int) -> tuple[float, float]:
    """What a FLOP count expects of SafeKey / plain SFT and reference / SafeKey at `length` (every weight trained, no
    gradient checkpointing): the query-masked pass runs up to K's end and projects K's positions; the reference runs a
    second full-length step."""
    key_end = int(KEY_END_SHARE * length)
    key_tokens = key_end - int(KEY_START_SHARE * length)
    plain = training_step_macs(shape, length)
    safekey = plain + training_step_macs(shape, key_end, projected=key_tokens)
    return safekey / plain, 2 * plain / safekey


def print_flop_table(shapes: dict[str, ModelShape], lengths: list[int]) -> None:
    """The FLOP count behind the shapes: multiply-adds per token of a forward, and the LM head's share."""
    print(f"Multiply-adds per token of a forward (millions), at {SHARE_LENGTH:,} tokens:\n")
    print(
        "| model | linear layers | attention | LM head | LM-head share | SafeKey / plain SFT | reference / SafeKey |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, shape in {REFERENCE_MODEL: reference_shape(), **shapes}.items():
        linear, head = shape.linear_macs_per_token(), shape.head_macs_per_token()
        attention = shape.attention_macs(SHARE_LENGTH) / SHARE_LENGTH
        safekey, reference = expected_ratios(shape, SHARE_LENGTH)
        print(
            f"| {name} (hidden {shape.hidden}, MLP {shape.intermediate}, {shape.layers} layers, {shape.heads}/"
            f"{shape.kv_heads} heads, vocab {shape.vocab:,}) | {linear / 1e6:.1f} | {attention / 1e6:.1f} | "
            f"{head / 1e6:.1f} | {100 * shape.head_share(SHARE_LENGTH):.1f}% | {safekey:.3f} | {reference:.2f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    shapes = {name: SHAPES[name]() for name in args.shapes}
    output_dir = tempfile.mkdtemp()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} threads"
    print(
        f"# SafeKey step cost: batch {args.batch_size}, {args.dtype}, {args.attn}, {device}; torch {torch.__version__}"
    )
    print(f"# time: median of {args.steps} steps after a warm-up; memory: peak growth over one step (MiB)\n")
    print_flop_table(shapes, args.lengths)
    batches = {
        (name, length): make_batch(length, args.batch_size, shape.vocab, seed=length)
        for name, shape in shapes.items()
        for length in args.lengths
    }
    measure = measure_one_at_a_time if args.device == "cuda" else measure_all_built
    times, memory = measure(shapes, batches, args, output_dir)
    # What `lm_head_kernel: auto` picks on this device
    default = "SafeKey, TRL head" if triton_runs_on(torch.device(args.device)) else "SafeKey, tiled head"
    print(f"# SafeKey's default here: {default}\n")
    for name, shape in shapes.items():
        print(f"## Shape {name}\n")
        print_tables(
            shape,
            args.lengths,
            {(length, m): times[name, length, m] for length in args.lengths for m in METHODS},
            {(length, m): memory[name, length, m] for length in args.lengths for m in METHODS},
            default,
        )
        print()


def print_tables(shape: ModelShape, lengths: list[int], times: dict, memory: dict, default: str) -> None:
    """Three Markdown tables: step times, peak memory, and the ratios (SafeKey's with its `default` kernel), the
    FLOP count's expectation beside the kernel-fixed ones."""
    for title, values, unit, digits in (("Step time", times, "s", 2), ("Peak memory growth", memory, "MiB", 0)):
        print(f"{title} ({unit}):\n")
        print("| tokens | " + " | ".join(METHODS) + " |")
        print("|---|" + "---|" * len(METHODS))
        for length in lengths:
            print(f"| {length} | " + " | ".join(f"{values[length, m]:.{digits}f}" for m in METHODS) + " |")
        print()
    ratios = {
        "SafeKey / plain SFT": (default, "plain SFT"),
        "reference / SafeKey": ("reference", default),
        "SafeKey / plain, TRL head": ("SafeKey, TRL head", "plain SFT"),
        "SafeKey / plain, tiled head": ("SafeKey, tiled head", "plain SFT, tiled head"),
    }
    print("Ratios (time; memory), and the time ratios a FLOP count expects:\n")
    print("| tokens | " + " | ".join(ratios) + " | expected SafeKey / plain | expected reference / SafeKey |")
    print("|---|" + "---|" * (len(ratios) + 2))
    for length in lengths:
        cells = [f"{_ratio(times, length, a, b)}; {_ratio(memory, length, a, b)}" for a, b in ratios.values()]
        cells += [f"{ratio:.2f}" for ratio in expected_ratios(shape, length)]
        print(f"| {length} | " + " | ".join(cells) + " |")


def _ratio(values: dict, length: int, numerator: str, denominator: str) -> str:
    # A small model's memory growth can be below what the resident set resolves: no ratio then
    if values[length, denominator] <= 0:
        return "n/a"
    return f"{values[length, numerator] / values[length, denominator]:.2f}"


if __name__ == "__main__":
    main()
