"""The lighteval backend: AIME 2024, MATH-500 and GPQA-Diamond (and LiveCodeBench on a sandboxed machine) run by
lighteval on vLLM, as open-r1 runs them, so that a model's numbers sit beside open-r1's.

The command is open-r1's (its README's "Evaluating models" and slurm/evaluate.slurm @ 1416fa0):

    lighteval vllm "model_name=MODEL,dtype=bfloat16,max_model_length=32768,gpu_memory_utilization=0.8,
        generation_parameters={max_new_tokens:32768,temperature:0.6,top_p:0.95}" "lighteval|aime24|0|0" \\
        --use-chat-template --output-dir OUTPUT_DIR --save-details

with the run's decoding settings in `generation_parameters` (the `deepseek-r1` preset's are open-r1's), its
`--max_model_len` (default: `max_new_tokens`, as open-r1 sets both to 32768), `--tensor_parallel_size` (then
`VLLM_WORKER_MULTIPROC_METHOD=spawn`, as vLLM's tensor parallelism needs) and `--gpu_memory_utilization` (0.8,
open-r1's). Task names are open-r1's (`lighteval|aime24|0|0`, `lighteval|math_500|0|0`, `lighteval|gpqa:diamond|0|0`,
`extended|lcb:codegeneration|0|0`), written for the lighteval open-r1 pins (commit d3da6b9b) and its `model_name=`
argument (lighteval 0.9 and later; 0.8 and earlier named it `pretrained=`); newer lighteval releases may name tasks
without the trailing `|0`: not checked here, where lighteval is not installed.

lighteval writes `OUTPUT_DIR/results/<model>/results_<timestamp>.json`, whose `results` maps each task to its metrics
(`metric` and `metric_stderr`); the newest such file is read back and shown. How many samples a task draws per
problem is the task's own (lighteval's metric), not `--samples`. LiveCodeBench runs the model's code: it is refused
unless the machine is declared a sandbox (`code_sandbox`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .generation import SamplingSettings

LIGHTEVAL_TASKS = {
    "aime24": "lighteval|aime24|0|0",
    "math500": "lighteval|math_500|0|0",
    "gpqa-diamond": "lighteval|gpqa:diamond|0|0",
    "livecodebench": "extended|lcb:codegeneration|0|0",
}
CODE_TASKS = ("livecodebench",)
OPEN_R1_MEMORY_SHARE = 0.8
INSTALL = "pip install 'safekey-trl[lighteval]' (on a CUDA machine: lighteval runs the model with vLLM)"


class LightevalFailed(RuntimeError):
    """lighteval ran and failed (its exit status is in the message; its own output is above it)."""


def lighteval_available() -> bool:
    """Whether the `lighteval` command is on the PATH."""
    return shutil.which("lighteval") is not None


def check_lighteval_suites(suites: Sequence[str], code_sandbox: bool = False) -> list[str]:
    """The suites lighteval can run, as given; anything else is an error naming it, and a code suite needs the
    machine declared a sandbox."""
    names = [suite.partition("=")[0] for suite in suites]
    for suite, name in zip(suites, names, strict=True):
        if "=" in suite:
            raise ValueError(f"--backend lighteval loads its tasks itself: it takes no local copy ({suite!r}).")
        if name not in LIGHTEVAL_TASKS:
            raise ValueError(
                f"--backend lighteval runs {', '.join(LIGHTEVAL_TASKS)}; {name!r} is not one of them (run the safety "
                "suites with the other backends)."
            )
        if name in CODE_TASKS and not code_sandbox:
            raise ValueError(
                f"{name} runs the code the model writes, and this package has no sandbox of its own: run it on a "
                "machine that is one (a container without network access or credentials) and say so with "
                "--code_sandbox."
            )
    if not names:
        raise ValueError("--backend lighteval needs --suite: aime24, math500, gpqa-diamond or livecodebench.")
    return names


def model_args(
    model: str,
    sampling: SamplingSettings,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    dtype: str = "auto",
) -> str:
    """lighteval's vLLM model argument, open-r1's with the run's settings."""
    parts = [
        f"model_name={model}",
        f"dtype={'bfloat16' if dtype == 'auto' else dtype}",
        *([f"tensor_parallel_size={tensor_parallel_size}"] if tensor_parallel_size > 1 else []),
        f"max_model_length={max_model_len or sampling.max_new_tokens}",
        f"gpu_memory_utilization={gpu_memory_utilization or OPEN_R1_MEMORY_SHARE}",
        "generation_parameters={"
        f"max_new_tokens:{sampling.max_new_tokens},temperature:{sampling.temperature:g},top_p:{sampling.top_p:g}"
        "}",
    ]
    return ",".join(parts)


@dataclass(frozen=True)
class LightevalCommand:
    """A lighteval run: its arguments and the environment it needs."""

    argv: list[str]
    env: dict[str, str]
    output_dir: Path


def lighteval_command(
    model: str,
    suites: Sequence[str],
    sampling: SamplingSettings,
    output_dir: str | Path,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    dtype: str = "auto",
) -> LightevalCommand:
    """The `lighteval vllm ...` command open-r1 runs, for `suites` (names of [`LIGHTEVAL_TASKS`])."""
    tasks = ",".join(LIGHTEVAL_TASKS[suite] for suite in suites)
    argv = [
        "lighteval",
        "vllm",
        model_args(model, sampling, max_model_len, tensor_parallel_size, gpu_memory_utilization, dtype),
        tasks,
        "--use-chat-template",
        "--output-dir",
        str(output_dir),
        "--save-details",
    ]
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"} if tensor_parallel_size > 1 else {}
    return LightevalCommand(argv, env, Path(output_dir))


def read_results(output_dir: str | Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The newest `results_*.json` lighteval wrote under `output_dir/results/`, and its `results` (task to metrics).

    Raises:
        FileNotFoundError: lighteval wrote none.
    """
    files = sorted(Path(output_dir).glob("results/**/results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{output_dir}: lighteval wrote no results/**/results_*.json")
    data = json.loads(files[-1].read_text(encoding="utf-8"))
    results = data.get("results")
    if not isinstance(results, dict):
        raise ValueError(f"{files[-1]}: no 'results' mapping of tasks to metrics")
    return files[-1], results


def run_lighteval(command: LightevalCommand) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Run lighteval and read back its results.

    Raises:
        ImportError: lighteval is not installed (the message says how to install it).
        LightevalFailed: lighteval failed (its exit status).
    """
    if not lighteval_available():
        raise ImportError(f"The lighteval backend needs the `lighteval` command: {INSTALL}.")
    command.output_dir.mkdir(parents=True, exist_ok=True)
    finished = subprocess.run(command.argv, env={**os.environ, **command.env}, check=False)
    if finished.returncode != 0:
        raise LightevalFailed(f"lighteval exited with status {finished.returncode}: {' '.join(command.argv[:4])} ...")
    return read_results(command.output_dir)
