"""What `safekey-trl data validate` costs on a large file: wall time, and peak memory of the process tree.

Each run gets a fresh datasets cache (a warm one would return the features without computing them). Memory is
sampled every 0.25 s: the largest resident set of one process, and the largest proportional set (PSS: shared pages
split between the processes sharing them) summed over the command and its worker processes.

    python bench/make_large_data.py /tmp/large.jsonl
    python bench/validate_cost.py /tmp/large.jsonl [--runs 2] [-- extra validate options]

Runs the `safekey-trl` beside this Python; set PYTHONPATH to measure another checkout. CPU time (user + system of the
command and its workers) moves less with the machine's load than wall time does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def measure(file: str, extra: list[str]) -> dict:
    cli = str(Path(sys.executable).parent / "safekey-trl")
    with tempfile.TemporaryDirectory(prefix="validate-cost-") as cache:
        env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE="1")
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        process = subprocess.Popen(
            [cli, "data", "validate", file, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        root = psutil.Process(process.pid)
        largest = total = 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                sizes = [member.memory_full_info() for member in tree]
            except psutil.Error:
                continue
            largest = max(largest, *(size.rss for size in sizes))
            total = max(total, sum(size.pss for size in sizes))
            time.sleep(0.25)
        wall = time.monotonic() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        output = process.stdout.read().decode()
        cache_mb = sum(path.stat().st_size for path in Path(cache).rglob("*") if path.is_file()) / 2**20
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),  # user + system, the command and its worker processes
        "cache_written_mb": round(cache_mb),
        "peak_rss_largest_process_mb": round(largest / 2**20),
        "peak_pss_all_processes_mb": round(total / 2**20),
        "load_average_after": os.getloadavg()[0],
        "exit_code": process.returncode,
        "valid_line": next((line.strip() for line in output.splitlines() if "valid:" in line), ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="options passed on to data validate (after --)")
    args = parser.parse_args()
    for _ in range(args.runs):
        print(json.dumps({"load_average_before": os.getloadavg()[0], **measure(args.file, args.extra)}), flush=True)


if __name__ == "__main__":
    main()
