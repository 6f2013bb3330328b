"""Writing outputs so that a failure loses nothing: a write probe before the expensive work, files written aside and
moved into place, and a full disk reported as one line naming the device, the path and what was kept.

Checkpoints, the final model and exports are written into a folder beside their target and moved in once whole, so a
full disk or an interruption never leaves a truncated file where a complete one is expected.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

# What a full disk looks like from the libraries that write for us: the OS error, safetensors' Rust I/O error, and
# torch's stream writer (which does not say why a write failed; the free space then tells)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")


class DiskFullError(OSError):
    """A write that failed because its filesystem is full (or over quota); the message says what was kept."""


class NotWritableError(OSError):
    """An output location that cannot be written (read-only, no permission); found before the expensive work."""


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def device_of(path: str | Path) -> str:
    """`DEVICE (mounted at MOUNT)` for the filesystem holding `path`, from /proc/mounts where there is one."""
    mount = mount_point(path)
    device = None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == str(mount):
                device = fields[0]  # the last entry for a mount point is the one in use
    except OSError:
        pass
    return f"{device} (mounted at {mount})" if device else str(mount)


def is_disk_full(error: BaseException, path: str | Path) -> bool:
    """Whether `error`, raised while writing under `path`, means the filesystem is full."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    if any(text in str(error) for text in _FULL_TEXT):
        return True
    if isinstance(error, (RuntimeError, OSError)) or type(error).__name__ == "SafetensorError":
        try:  # torch.save reports "file write failed" only: a full filesystem is the likely cause when nothing is left
            return shutil.disk_usage(mount_point(path)).free < 1 << 20
        except OSError:
            return False
    return False


def disk_full_error(path: str | Path, kept: str) -> DiskFullError:
    """The one-line error for a full disk while writing `path`: the device, the path, and what was kept."""
    return DiskFullError(errno.ENOSPC, f"no space left on {device_of(path)} while writing {path}; {kept}")


def check_writable(directory: str | Path, what: str) -> Path:
    """Create `directory` if needed and write a small file in it, so that a read-only or full filesystem is found
    before minutes go into loading a model or generating; raise [`NotWritableError`] or [`DiskFullError`] naming
    `what` (the option) and the directory."""
    directory = Path(directory)
    probe = directory / f"_safekey_write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, b"safekey-trl write check\n" * 64)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        if is_disk_full(error, directory):
            raise disk_full_error(directory, f"{what} needs room to write") from None
        raise NotWritableError(
            error.errno, f"{what} {directory}: cannot write there ({error.strerror or error})"
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return directory


def move_into(staging: str | Path, target: str | Path) -> list[Path]:
    """Move every entry of `staging` into `target` (same filesystem: each move is a rename, atomic per file), replacing
    entries of the same name, then remove `staging`. Returns the paths moved in."""
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for entry in sorted(staging.iterdir()):
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
        moved.append(destination)
    staging.rmdir()
    return moved
