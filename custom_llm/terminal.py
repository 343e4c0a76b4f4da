"""Lines for people, lines for logs: at a terminal a message is wrapped at word boundaries to the
terminal's width (read again for every message, so it follows a resized window); in a file, a
pipe or CI it stays one line per line of the message, so it can be grepped.

Library modules print through say(); nothing here imports the command line."""

import os
import re
import sys
import textwrap
import unicodedata
from typing import Optional

# A row of a two-column list ("  /temp F      what it does"): its continuation lines start under
# the second column. Two or more spaces after some text mark where that column begins.
_SECOND_COLUMN = re.compile(r"^(\s*\S.*?\s{2,})\S")


def width_of(stream) -> Optional[int]:
    """The width in columns of the terminal `stream` writes to; None when it is not a terminal
    (a file, a pipe) or the terminal does not say (a pseudo-terminal whose size was never set)."""
    try:
        if not stream.isatty():
            return None
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):   # closed, or no file descriptor (StringIO)
        return None
    return columns or None


def display_width(text: str) -> int:
    """Columns text takes at a terminal: East Asian wide and full-width characters take two,
    combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def wrap(text: str, width: Optional[int]) -> str:
    """Each line of text wrapped at word boundaries to fit `width` columns (None: unchanged).
    Continuation lines are indented two spaces past the line's own indent, or aligned with the
    second column of a two-column row. A word longer than a whole line is broken. (textwrap counts
    characters: a line of wide characters may still be wider than width.)"""
    if width is None:
        return text
    # The last column is left free: some terminals move to the next line as soon as it is written.
    width = max(width - 1, 20)
    out = []
    for line in text.split("\n"):
        if display_width(line) <= width:
            out.append(line)
            continue
        indent = line[:len(line) - len(line.lstrip())]
        column = _SECOND_COLUMN.match(line)
        hang = " " * len(column.group(1)) if column and len(column.group(1)) <= width // 2 else indent + "  "
        wrapper = textwrap.TextWrapper(width=width, subsequent_indent=hang, break_on_hyphens=False,
                                       break_long_words=True)
        out.extend(wrapper.wrap(line))
    return "\n".join(out)


def wrap_for(stream, text: str) -> str:
    """text as it should be printed on stream: wrapped to the terminal's width at a terminal,
    unchanged elsewhere."""
    return wrap(text, width_of(stream))


def say(text: str = "", file=None, end: str = "\n") -> None:
    """Print a message for people: wrapped at a terminal, one line per line in a log. Standard
    output is flushed first, so a message on stderr comes after the text printed before it."""
    file = file or sys.stdout
    if file is not sys.stdout and sys.stdout is not None and not sys.stdout.closed:
        sys.stdout.flush()
    file.write(wrap_for(file, text) + end)
    file.flush()
