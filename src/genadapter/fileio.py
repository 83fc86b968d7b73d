"""Atomic file writes: an output file is either complete or absent, never half-written."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import GenAdapterError

PEFT_MARKER = "adapter_config.json"  # the file that makes a directory a PEFT adapter


def _describe(exc: OSError, target: Path) -> GenAdapterError:
    if exc.errno == errno.ENOSPC:
        return GenAdapterError(f"no space left on device while writing {target}")
    return GenAdapterError(f"cannot write {target}: {exc.strerror or exc}")


def _umask() -> int:
    """The process umask, read without changing it where the system tells it (os.umask can only set it, and setting
    it for a moment would affect files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or directory (0700) the mode a plain open() or mkdir() would have given it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_atomic(target: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) on a temporary file next to target, then rename it into place."""
    target = Path(target)
    if target.is_dir():
        raise GenAdapterError(f"{target} is a directory")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise GenAdapterError(f"directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        _usual_mode(tmp)
        write(Path(tmp))
        os.replace(tmp, target)
    except OSError as exc:
        raise _describe(exc, target) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_replaceable_dir(target: str | Path, marker: str) -> None:
    """A directory we may (re)write: absent, empty, or an earlier output of ours (it holds `marker`)."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise GenAdapterError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not (target / marker).is_file():
            raise GenAdapterError(f"{target} is a non-empty directory without {marker}; not replacing it")
    elif not target.parent.is_dir():
        raise GenAdapterError(f"directory {target.parent} does not exist")


def write_dir_atomic(target: str | Path, write: Callable[[Path], None], marker: str) -> None:
    """Like write_atomic for a directory: build it beside target, then swap it in (see check_replaceable_dir)."""
    target = Path(target)
    check_replaceable_dir(target, marker)
    parent = target.parent if str(target.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        _usual_mode(tmp, directory=True)
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise _describe(exc, target) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
