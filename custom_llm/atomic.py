"""Files that are never left half-written: every file or folder is written under a temporary name
beside its destination and moved into place only when it is complete, so an interrupted or failed
run leaves the old file or the new one, never half of one, and a failed write leaves no temporary.

Several outputs can be staged together (convert_to_gguf.py writes and checks all of its exports
first) and moved into place only when all of them are good. A failed write, whatever the library
raised for it (torch.save, tokenizers, safetensors, gguf, llama.cpp), becomes one line naming the
file and the reason: a full disk or the file size limit is said as such."""

import ctypes
import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

from custom_llm.errors import UserError

try:
    import resource
except ImportError:   # Windows: no file size limit to report
    resource = None

# Less free space than this after a failed write: the disk is full (what filled it was just removed).
FULL_DISK_BYTES = 1 << 20


class Staging:
    """Outputs written under temporary names beside their destinations (`path`), moved into place
    together by commit(); discard() removes every temporary that was not moved."""

    def __init__(self):
        self.entries = []   # (temporary, destination or None for scratch space)

    @contextmanager
    def path(self, destination: str, folder: bool = False, scratch: bool = False):
        """Yield the temporary path to write destination's content to (an empty folder when
        folder is true). Whatever the block raises becomes a one-line UserError naming destination.
        A scratch path holds intermediate data: it never moves into place, discard() removes it."""
        destination = os.path.abspath(destination)
        tmp = _reserve(destination, folder, ".tmp")
        self.entries.append((tmp, None if scratch else destination))
        try:
            yield tmp
        except UserError:
            raise
        except Exception as err:
            reason = write_failure(err, tmp)
            if reason is None:   # not a failed write: a bug, shown as one
                raise
            raise UserError(f"cannot write {destination}: {reason}"
                            + ("" if scratch else "; the previous file is untouched")) from err

    def commit(self) -> None:
        """Move every staged output into place (files are flushed to disk first)."""
        for tmp, destination in self.entries:
            if destination is None:
                continue
            try:
                _fsync_tree(tmp)
                if os.path.isdir(tmp):
                    _put_folder(tmp, destination)
                else:
                    os.replace(tmp, destination)
            except OSError as err:
                raise UserError(f"cannot write {destination}: {write_failure(err, tmp)}; "
                                "the previous file is untouched") from err

    def discard(self) -> None:
        for tmp, _ in self.entries:
            _remove(tmp)
        self.entries = []


@contextmanager
def staging():
    """A Staging whose outputs move into place when the block ends normally; on any failure
    (or Ctrl-C) nothing moves and the temporaries are removed."""
    stage = Staging()
    try:
        yield stage
        stage.commit()
    finally:
        stage.discard()


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path in the destination's folder; move it into place only when the
    block finishes, so a crash leaves the old file or the new one, never half of one."""
    with staging() as stage, stage.path(path) as tmp:
        yield tmp


@contextmanager
def atomic_dir(path: str):
    """Like atomic_path, for a folder: build it aside, then swap it in."""
    with staging() as stage, stage.path(path, folder=True) as tmp:
        yield tmp


def write_failure(err: BaseException, tmp: str):
    """Why a write failed, in words: the system's reason where there is one, a full disk or the
    file size limit where the library only said that its write failed (torch says 'unexpected
    pos', gguf 'N requested and M written'), else an OSError's own message. None when err is no
    failed write at all."""
    code = err.errno if isinstance(err, OSError) and err.errno else None
    said = str(err)
    if code is None and (match := re.search(r"os error (\d+)", said)):   # Rust: tokenizers, safetensors
        code = int(match.group(1))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else None
    limited = limit not in (None, getattr(resource, "RLIM_INFINITY", None))
    if code is None:
        try:
            if shutil.disk_usage(os.path.dirname(tmp)).free < FULL_DISK_BYTES:
                code = errno.ENOSPC
        except OSError:
            pass
    if code is None and limited and _largest_file(tmp) >= limit:
        code = errno.EFBIG
    if code == errno.EFBIG and limited:
        return f"{os.strerror(code)} (this process may write files of at most {limit:,} bytes: ulimit -f)"
    if code is not None:
        return os.strerror(code)
    if not isinstance(err, OSError):
        return None
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


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
    """Delete what a killed run left of its writes to path: its temporary files and folders, and
    a previous folder set aside during a swap (put back first if path itself is missing). Only
    the run about to write path again should call this."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    leftovers = [os.path.join(folder, name) for name in names if _is_temporary_of(path, name)]
    set_aside = sorted((p for p in leftovers if p.endswith(".old")), key=os.path.getmtime)
    if set_aside and not os.path.lexists(path):
        try:
            os.rename(set_aside[-1], path)   # killed between the two renames of a swap
        except OSError:
            pass
    for leftover in leftovers:
        _remove(leftover)


# ---------------------------------------------------------------------------- details

def _reserve(destination: str, folder: bool, suffix: str) -> str:
    """A new, empty temporary file or folder named .<destination's name>.XXXXXXXX<suffix>
    beside destination."""
    parent = os.path.dirname(destination)
    prefix = f".{os.path.basename(destination)}."
    try:
        if folder:
            tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
            os.chmod(tmp, 0o777 & ~_umask())
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
    except FileNotFoundError:
        raise UserError(f"cannot write {destination}: folder {parent} does not exist") from None
    except PermissionError:
        raise UserError(f"cannot write {destination}: folder {parent} is not writable") from None
    except OSError as err:
        raise UserError(f"cannot write {destination}: {err.strerror or err}") from None
    return tmp


def _is_temporary_of(path: str, name: str) -> bool:
    """name is one of _reserve's names for path (tempfile adds 8 characters of [a-z0-9_])."""
    return re.fullmatch(re.escape(f".{os.path.basename(path)}.") + r"[a-z0-9_]{8}\.(tmp|old)", name) is not None


def _put_folder(new: str, path: str) -> None:
    """Move the folder new to path. Where the system can swap two names in one step (Linux), the
    old folder is swapped out, so there is no moment without a folder at path; elsewhere it is
    renamed aside first (remove_stale_temporaries puts it back if a kill comes in between)."""
    if not os.path.lexists(path):
        os.rename(new, path)
    elif _exchange(new, path):
        _remove(new)   # new now holds the previous folder
    else:
        old = _reserve(path, True, ".old")
        os.rmdir(old)   # only its name is wanted
        os.rename(path, old)
        os.rename(new, path)
        _remove(old)


def _exchange(a: str, b: str) -> bool:
    """Swap the names a and b atomically (renameat2 with RENAME_EXCHANGE); False where the system
    or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def _fsync_tree(path: str) -> None:
    files = [path] if not os.path.isdir(path) else \
        [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names]
    for name in files:
        with open(name, "rb") as f:
            os.fsync(f.fileno())


def _largest_file(path: str) -> int:
    try:
        if not os.path.isdir(path):
            return os.path.getsize(path)
        return max((os.path.getsize(os.path.join(folder, name))
                    for folder, _, names in os.walk(path) for name in names), default=0)
    except OSError:
        return 0


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
