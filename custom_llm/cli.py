"""What every stage script shares at the terminal: questions that are also flags,
one-line errors instead of tracebacks, and files that are never left half-written."""

import argparse
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional


class UserError(Exception):
    """A problem the user can fix. Printed as one line; exit status 2 for usage errors."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def run(main: Callable[[], None]) -> None:
    """Run a script's main(): user errors become one line on stderr, never a traceback
    (unless --debug is given)."""
    debug = "--debug" in sys.argv
    try:
        main()
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); nothing useful left to say.
        sys.stderr.close()
        sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------- questions

def parse_number(text: str, kind=float):
    """int or float from text, or ValueError with a reason a user can read."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{text} must be a finite number")
    return value


def positive_int(text: str) -> int:
    value = parse_number(text, int)
    if value <= 0:
        raise ValueError(f"{value} must be a positive whole number")
    return value


def positive_float(text: str) -> float:
    value = parse_number(text, float)
    if not 0 < value < float("inf"):
        raise ValueError(f"{text} must be a positive number")
    return value


def fraction(text: str) -> float:
    """A probability such as dropout: 0 <= value < 1."""
    value = parse_number(text, float)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{text} must be at least 0 and below 1")
    return value


def existing_file(text: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a file")
    return path


@dataclass
class Question:
    name: str                     # flag name and dict key
    prompt: str                   # what the user reads
    default: Any
    parse: Callable[[str], Any]   # raises ValueError(reason) on a bad answer
    # Optional check against earlier answers; returns a reason string when the value is bad.
    check: Optional[Callable[[Any, dict], Optional[str]]] = None

    def validate(self, text: str, answers: dict):
        value = self.parse(text)
        reason = self.check(value, answers) if self.check else None
        if reason:
            raise ValueError(reason)
        return value


def add_question_flags(parser: argparse.ArgumentParser, questions) -> None:
    for q in questions:
        parser.add_argument(f"--{q.name}", type=str, default=None,
                            help=f"{q.prompt} (default: {q.default})")
    parser.add_argument("--yes", "-y", action="store_true",
                        help="take the default for every question not given as a flag")


def ask(title: str, questions, args) -> dict:
    """Answer each question from its flag, else from stdin, else its default.

    A bad flag or piped answer is a usage error (exit 2); at a terminal the question is
    asked again with the reason. End of input (or --yes) takes the remaining defaults."""
    answers: dict = {}
    interactive = sys.stdin is not None and sys.stdin.isatty()
    out_of_input = bool(getattr(args, "yes", False)) or sys.stdin is None or sys.stdin.closed
    title_shown = False
    for q in questions:
        flag_value = getattr(args, q.name, None)
        if flag_value is not None:
            try:
                answers[q.name] = q.validate(str(flag_value), answers)
            except ValueError as reason:
                raise UserError(f"--{q.name}: {reason}", exit_code=2) from None
            continue
        if out_of_input:
            answers[q.name] = q.default
            continue
        if not title_shown:
            print(title)
            title_shown = True
        while True:
            prompt = f"  {q.prompt} [{q.default}]: "
            if interactive:
                try:
                    line = input(prompt)
                except EOFError:
                    print()
                    line = None
            else:
                print(prompt, end="", flush=True)
                line = sys.stdin.readline()
                if line == "":
                    line = None
                print(line.strip() if line is not None else "", flush=True)
            if line is None:
                out_of_input = True
                answers[q.name] = q.default
                break
            if line.strip() == "":
                answers[q.name] = q.default
                break
            try:
                answers[q.name] = q.validate(line.strip(), answers)
                break
            except ValueError as reason:
                if not interactive:
                    raise UserError(f"{q.name}: {reason}", exit_code=2) from None
                print(f"  {reason}; please try again.")
    return answers


# ---------------------------------------------------------------------------- safe files

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


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
