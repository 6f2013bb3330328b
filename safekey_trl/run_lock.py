"""One run per `output_dir`: a lock naming its holder, and a finished run's folder never silently trained over.

A training takes `output_dir/_safekey.lock` (host, process id, start time) before loading anything; a second run into
the same folder is refused, naming the holder. A lock left by a process that is gone (killed, or its machine
rebooted) is taken over with a warning; one held on another host cannot be checked from here and is refused with the
command that clears it. Only the main process takes the lock; under several processes its outcome is broadcast, so
that every process starts or stops alike.

transformers 5 dropped `overwrite_output_dir`; SafeKey keeps its old meaning: a folder that holds a run's model or
checkpoints is refused unless the run resumes from it or `overwrite_output_dir` is set (which removes the old
checkpoints, so that an auto-resume cannot mistake them for this run's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = "_safekey.lock"
# Where checkpoints and the final model are written before they are moved into place (see `outputs`); the leading
# underscore keeps it out of what `push_to_hub` uploads, as the lock
STAGING_DIR = "_safekey_incomplete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files of a finished run at the top of output_dir (the final save; checkpoints live in checkpoint-*)
FINISHED_RUN_FILES = (
    "safekey_head.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
)
# Locks this process holds, by resolved path, with how many times (re-entrant: `sft.train` and the trainer)
_HELD: dict[str, int] = {}


class OutputDirInUseError(ValueError):
    """`output_dir` is held by another live run, or holds a finished run that would be overwritten."""


def _process_start(pid: int) -> str | None:
    # Linux: the start time of a process in clock ticks since boot; tells a reused pid from the lock's holder
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    now = _process_start(pid)
    return started is None or now is None or now == started


def this_process() -> dict[str, Any]:
    """What a lock records of its holder."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def describe_holder(holder: dict[str, Any]) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _read_holder(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held, by an unknown holder
    return holder if isinstance(holder, dict) else {}


def _is_us(holder: dict[str, Any]) -> bool:
    me = this_process()
    return holder.get("host") == me["host"] and holder.get("pid") == me["pid"]


def _create(lock: Path, content: str) -> bool:
    """Create `lock` holding `content` atomically; False when it exists. A hard link of a written file is atomic and
    safe on NFS; where links are not supported, an exclusive create is the fallback."""
    temporary = lock.with_name(f"{lock.name}.{socket.gethostname()}.{os.getpid()}")
    temporary.write_text(content, encoding="utf-8")
    try:
        os.link(temporary, lock)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(content)
        return True
    finally:
        temporary.unlink(missing_ok=True)


def acquire(output_dir: str | Path) -> None:
    """Take `output_dir`'s lock for this process (re-entrant), taking over a stale one; raise
    [`OutputDirInUseError`] naming the live holder."""
    directory = Path(output_dir)
    key = str(directory.resolve())
    if key in _HELD:
        _HELD[key] += 1
        return
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    content = json.dumps(this_process(), indent=1) + "\n"
    for _ in range(10):
        if _create(lock, content):
            _HELD[key] = 1
            return
        holder = _read_holder(lock)
        if holder is None:
            continue  # released in between: try again
        if holder and _is_us(holder):
            _HELD[key] = 1
            return
        if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"], holder.get("process_start")):
                # Renaming is atomic: of two runs taking over the same stale lock, one wins, the other retries
                aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
                try:
                    os.replace(lock, aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                logger.warning(
                    "%s: took over a stale lock: its holder, %s, is no longer running.", lock, describe_holder(holder)
                )
                continue
        who = describe_holder(holder) if holder else "an unknown process (the lock file is unreadable)"
        raise OutputDirInUseError(
            f"output_dir {directory} is in use by another run: {who}. Wait for it to finish or give another "
            f"--output_dir; if that run is no longer running (on another host it cannot be checked from here), "
            f"delete {lock}."
        )
    raise OutputDirInUseError(f"output_dir {directory}: could not take {lock} (it keeps changing hands)")


def release(output_dir: str | Path) -> None:
    """Release this process's hold on `output_dir`'s lock; the file goes when the last hold does."""
    directory = Path(output_dir)
    key = str(directory.resolve())
    if key not in _HELD:
        return
    _HELD[key] -= 1
    if _HELD[key] > 0:
        return
    del _HELD[key]
    lock = directory / LOCK_NAME
    holder = _read_holder(lock)
    if holder and _is_us(holder):
        lock.unlink(missing_ok=True)


def holds(output_dir: str | Path) -> bool:
    """Whether this process holds `output_dir`'s lock."""
    return str(Path(output_dir).resolve()) in _HELD


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, by step."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in directory.iterdir() if (m := _CHECKPOINT.match(path.name))]
    return [path for _, path in sorted(found) if path.is_dir()]


def check_reuse(output_dir: str | Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run over a finished run's model or an earlier run's checkpoints (unless `resuming` or
    `overwrite`, which removes those checkpoints); clear what an interrupted save left in the staging folder."""
    directory = Path(output_dir)
    staging = directory / STAGING_DIR
    if staging.is_dir():
        leftovers = sorted(path.name for path in staging.iterdir())
        shutil.rmtree(staging, ignore_errors=True)
        if leftovers:
            logger.warning("%s: removed what an interrupted save left unfinished: %s", staging, ", ".join(leftovers))
    if resuming:
        return
    finished = [name for name in FINISHED_RUN_FILES if (directory / name).is_file()]
    earlier = checkpoints(directory)
    if not finished and not earlier:
        return
    if overwrite:
        for checkpoint in earlier:
            shutil.rmtree(checkpoint)
        if earlier:
            logger.warning(
                "overwrite_output_dir: removed the earlier run's checkpoints in %s: %s",
                directory,
                ", ".join(path.name for path in earlier),
            )
        return
    what = f"a finished run ({', '.join(finished)})" if finished else "an earlier run's checkpoints"
    if earlier:
        what += (
            f" and {len(earlier)} checkpoint(s), the last {earlier[-1].name}" if finished else f" ({earlier[-1].name})"
        )
    raise OutputDirInUseError(
        f"output_dir {directory} holds {what}: a new run would overwrite it. Resume it with "
        "--resume_from_checkpoint true, give another --output_dir, or pass --overwrite_output_dir true to replace it."
    )


@contextlib.contextmanager
def output_dir_guard(output_dir: str | Path, resuming: bool, overwrite: bool) -> Iterator[None]:
    """Hold `output_dir` for a training: the main process checks it can write there, takes the lock and checks the
    folder may be (re)used; every process gets the same outcome. Re-entrant within a process: an inner guard on a
    folder this process already holds checks nothing again."""
    from accelerate import PartialState

    from .outputs import check_writable

    state = PartialState()
    took = False
    error: Exception | None = None
    if state.is_main_process and not holds(output_dir):
        try:
            check_writable(output_dir, "output_dir")
            acquire(output_dir)
            took = True
            check_reuse(output_dir, resuming, overwrite)
        except (OSError, ValueError) as raised:
            if took:
                release(output_dir)
                took = False
            error = raised
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([None if error is None else str(error)], from_process=0)[0]
        if outcome is not None and error is None:
            error = OutputDirInUseError(outcome)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if took:
            release(output_dir)
