"""What every stage script shares at the terminal: questions that are also flags, numeric
flags checked against their range (flags.py), and one-line errors instead of tracebacks."""

import argparse
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from custom_llm.errors import UserError
from custom_llm.flags import NUMBERS
from custom_llm.terminal import say, width_of, wrap

ANSWER_ROOM = 8   # columns a question's last line leaves free for a typed answer


def run(main: Callable[[], None]) -> None:
    """Run a script's main(): user errors become one line on stderr, never a traceback
    (unless --debug is given)."""
    debug = "--debug" in sys.argv
    try:
        main()
    except UserError as err:
        if debug:
            raise
        say(f"error: {err}", sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); nothing useful left to say.
        sys.stderr.close()
        sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2, and numeric flags from flags.NUMBERS
    checked against their range before the script reads or writes anything."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        self.checks = {}    # flag name -> its parser, run by parse_args on what the command line gave

    def error(self, message):
        say(f"error: {message} (see --help)", sys.stderr)
        sys.exit(2)

    def add_number(self, name: str, default=None, shown_default=None) -> None:
        """--name, a number in the range flags.NUMBERS gives it."""
        number = NUMBERS[name]
        shown = default if shown_default is None else shown_default
        help_text = f"{number.meaning}; {number.describe()}" + ("" if shown is None else f" (default: {shown})")
        self.add_argument(f"--{name}", default=default, metavar="N" if number.kind is int else "F",
                          help=help_text.replace("%", "%%"))
        self.checks[name] = number.parse

    def parse_args(self, *args, **kwargs):
        parsed = super().parse_args(*args, **kwargs)
        for name, parse in self.checks.items():
            given = getattr(parsed, name)
            if isinstance(given, str):   # from the command line; defaults are numbers already
                try:
                    setattr(parsed, name, parse(given))
                except ValueError as reason:
                    raise UserError(f"--{name}: {reason}", 2) from None
        return parsed


# ---------------------------------------------------------------------------- questions

@dataclass
class Question:
    name: str                     # flag name and dict key
    prompt: str                   # what the user reads
    default: Any
    # Raises ValueError(reason) on a bad answer; None: a number in the range flags.NUMBERS gives.
    parse: Optional[Callable[[str], Any]] = None
    # Optional check against earlier answers; returns a reason string when the value is bad.
    check: Optional[Callable[[Any, dict], Optional[str]]] = None
    # The flag takes several words, read as one answer: joined with spaces, quoted where needed.
    several: bool = False
    # Optional: why the question does not apply, given earlier answers (None: it does). Such a
    # question is not asked and gets no answer; given as a flag, it is a usage error.
    not_applicable: Optional[Callable[[dict], Optional[str]]] = None

    def __post_init__(self):
        if self.parse is None:
            self.parse = NUMBERS[self.name].parse

    def validate(self, text: str, answers: dict):
        value = self.parse(text)
        reason = self.check(value, answers) if self.check else None
        if reason:
            raise ValueError(reason)
        return value


def add_question_flags(parser: ArgumentParser, questions) -> None:
    """A flag per question; numeric ones are checked by parse_args, before anything else runs."""
    for q in questions:
        number = NUMBERS.get(q.name)
        parser.add_argument(f"--{q.name}", type=str, default=None, nargs="+" if q.several else None,
                            metavar=None if number is None else "N" if number.kind is int else "F",
                            help=q.prompt + ("" if number is None else f"; {number.describe()}")
                            + f" (default: {q.default})")
        if number is not None:
            parser.checks[q.name] = q.parse
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
        reason = q.not_applicable(answers) if q.not_applicable else None
        if reason:
            if flag_value is not None:
                raise UserError(f"--{q.name}: {reason}", exit_code=2)
            continue
        if flag_value is not None:
            try:
                text = shlex.join(flag_value) if isinstance(flag_value, list) else str(flag_value)
                answers[q.name] = q.validate(text, answers)
            except ValueError as reason:
                raise UserError(f"--{q.name}: {reason}", exit_code=2) from None
            continue
        if out_of_input:
            answers[q.name] = q.default
            continue
        if not title_shown:
            say(title)
            title_shown = True
        answers[q.name], out_of_input = ask_one(q, answers, interactive)
    return answers


def ask_one(q: Question, answers: dict, interactive: bool):
    """(the answer to q, whether input has ended): asked until valid at a terminal, read once
    from a pipe; an empty line, or the end of input, is the default."""
    while True:
        line = read_line(f"  {q.prompt} [{q.default}]: ", interactive)
        if line is None or line.strip() == "":
            return q.default, line is None
        try:
            return q.validate(line.strip(), answers), False
        except ValueError as reason:
            if not interactive:
                raise UserError(f"{q.name}: {reason}", exit_code=2) from None
            say(f"  {reason}; please try again.")


def read_line(prompt: str, interactive: bool):
    """One line typed or piped after the prompt; None at the end of input. At a terminal a long
    question is wrapped: its first lines printed, the last one is input()'s; from a pipe the
    answer is echoed after the question, so a log reads like the session."""
    if interactive:
        width = width_of(sys.stdout)
        *first_lines, last_line = wrap(prompt.rstrip(), width and width - ANSWER_ROOM).split("\n")
        for line in first_lines:
            print(line)
        try:
            return input(last_line + " ")
        except EOFError:
            print()
            return None
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    print(line.strip(), flush=True)
    return line if line != "" else None
