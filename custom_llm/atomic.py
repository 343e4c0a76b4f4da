"""Files that are never left half-written: every file is written under a temporary name beside
its destination and renamed into place, so an interrupted run leaves the old file or the new one."""

import os
import shutil
import tempfile
from contextlib import contextmanager

from custom_llm.cli import UserError


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path in the destination's folder; move it into place only when the
    block finishes, so a crash leaves the old file or the new one, never half of one."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except FileNotFoundError:
        raise UserError(f"cannot write {path}: folder {folder} does not exist") from None
    except PermissionError:
        raise UserError(f"cannot write {path}: folder {folder} is not writable") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}; the previous file is untouched") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str):
    """Like atomic_path, for a folder: build it aside, then swap it in."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str) -> None:
    """Fail early, before hours of work, when path's folder cannot take a new file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except FileNotFoundError:
        raise UserError(f"cannot write {path}: folder {folder} does not exist", 2) from None
    except OSError as err:
        raise UserError(f"cannot write {path}: folder {folder} is not writable ({err.strerror})", 2) from None


def remove_stale_temporaries(path: str) -> None:
    """Delete what a killed run left of its atomic writes to path (its temporary siblings); the
    file itself is whole either way. Only the run about to write path again should call this."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
