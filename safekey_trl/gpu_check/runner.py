"""Running the checks: each in a fresh process under its time budget, whatever the others did; what each needs to
run at all; and the report, rewritten after every check so that a run stopped part-way leaves what it measured."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import multiprocessing
import os
import queue
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .results import CheckResult


def needs_cuda() -> str | None:
    """Why a check cannot run here (no CUDA device), or None."""
    return None if torch.cuda.is_available() else "no CUDA device"


def needs_module(module: str, install: str) -> Callable[[], str | None]:
    """A requirement: CUDA and an importable `module`; the reason names how to install it."""

    def requirement() -> str | None:
        missing_cuda = needs_cuda()
        if missing_cuda:
            return missing_cuda
        if importlib.util.find_spec(module) is None:
            return f"`{module}` is not installed ({install})"
        return None

    return requirement


@dataclass
class Check:
    """A check to run: its function and keyword arguments, what it needs (a function giving the reason it cannot
    run, or None), and its time budget in seconds, process start and imports included."""

    name: str
    function: Callable[..., CheckResult]
    budget: float
    requires: Callable[[], str | None] = needs_cuda
    kwargs: dict = field(default_factory=dict)
    what: str = ""  # one line for the report's list of checks


def _run_in_child(function: Callable[..., CheckResult], kwargs: dict, results: multiprocessing.Queue) -> None:
    # A process group of its own: what the check starts (a benchmark, an accelerate launch and its workers) ends
    # with it, so that a check stopped at its budget leaves nothing running on the GPU
    os.setpgrp()
    try:
        results.put(function(**kwargs))
    except BaseException as error:  # noqa: BLE001 - the parent reports anything, and goes on
        last = traceback.format_exception(error)[-1].strip()  # "RuntimeError: CUDA out of memory"
        results.put(CheckResult("", "error", last[:400]))


def _end_process_group(process: multiprocessing.Process) -> None:
    """Kill the check's process and whatever it started that still runs (its process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    if process.is_alive():
        process.kill()
    process.join()


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
    if result is not None:
        process.join(timeout=5)  # let it exit on its own once it has answered
    _end_process_group(process)
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
    after_each: Callable[[list[CheckResult], list[Check]], None] | None = None,
) -> list[CheckResult]:
    """Every check in turn, whatever the previous ones gave. Each result is printed as it comes, with the parts of
    the check that could not run; `after_each(results so far, checks still to run)` is called after each (the
    report is rewritten there) and once before the first."""
    results: list[CheckResult] = []
    if after_each is not None:
        after_each(results, list(checks))
    for index, check in enumerate(checks):
        if check.requires() is None:
            echo(f"{check.name}: running (budget {check.budget * budget_scale:.0f} s)")
        result = run_check(check, budget_scale, start_method)
        echo(f"{result.name}: {result.status} ({result.seconds:.0f} s) {result.detail}")
        for part in result.skipped:
            echo(f"{result.name}: part skipped: {part}")
        results.append(result)
        if after_each is not None:
            after_each(results, checks[index + 1 :])
    return results


def summary(results: list[CheckResult], pending: list[Check] = ()) -> str:
    """One line of counts, then every check or part of one that did not run, with why."""
    counts = {status: sum(r.status == status for r in results) for status in ("pass", "fail", "error", "timeout")}
    ran = sum(counts.values())
    skipped = [r for r in results if r.status == "skip"]
    line = f"ran {ran} of {len(results) + len(pending)}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    line += f"; skipped {len(skipped)}"
    lines = [line]
    lines += [f"- skipped {r.name}: {r.detail}" for r in skipped]
    lines += [f"- part of {r.name} skipped: {part}" for r in results for part in r.skipped]
    lines += [f"- not run yet: {check.name}" for check in pending]
    return "\n".join(lines)


def render_table(results: list[CheckResult], pending: list[Check] = ()) -> str:
    """The results, and the checks still to run, as a Markdown table."""
    lines = ["| check | result | seconds | detail |", "|---|---|---|---|"]
    for result in results:
        detail = result.detail
        if result.skipped:
            detail += "; skipped: " + "; ".join(result.skipped)
        detail = detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {result.name} | {result.status} | {result.seconds:.0f} | {detail} |")
    for check in pending:
        lines.append(f"| {check.name} | pending | | not run yet: the run stopped before it, or is still going |")
    return "\n".join(lines)


VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed", "flash-attn")


def software_versions() -> str:
    """The versions of the libraries the checks exercise ("not installed" where one is missing)."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return ", ".join(f"{name} {version(name)}" for name in VERSIONED) + cuda


def describe_device() -> str:
    """The CUDA devices: how many, their name and memory. Read with `nvidia-smi` where it is there, so that this
    process (which runs no check) holds no CUDA context on the GPU the checks measure."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    if listed:
        gpus = [line.rsplit(",", 1) for line in listed.splitlines()]
        name, mib = gpus[0]
        return f"{len(gpus)} x {name.strip()} ({float(mib) / 1024:.0f} GiB)"
    properties = torch.cuda.get_device_properties(0)
    return f"{torch.cuda.device_count()} x {properties.name} ({properties.total_memory / 2**30:.0f} GiB)"


def write_report(
    path: Path,
    results: list[CheckResult],
    device: str,
    when: datetime.datetime,
    pending: list[Check] = (),
    command: str = "make gpu-check",
    versions: str | None = None,
) -> None:
    """`docs/gpu.md`: the date, the device and software, the counts, the table (with the checks still to run), and
    any long output (the benchmark's tables)."""
    versions = software_versions() if versions is None else versions
    done = "" if not pending else f" Stopped or still running: {len(results)} of {len(results) + len(pending)} done."
    parts = [
        "# GPU checks",
        "",
        f"`{command}` on {when:%Y-%m-%d %H:%M} UTC. Device: {device}; {versions}.{done}",
        "",
        render_table(results, pending),
        "",
        summary(results, pending),
        "",
    ]
    for result in results:
        if result.output:
            parts += [f"## {result.name}", "", result.output.strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(parts))
    temporary.replace(path)  # whole or not at all, even if the run is killed while writing
