"""What a training run shows while it runs: at a terminal, one line that rewrites itself in place
(steps, a bar, the loss, tokens/s and the time left), fitted to the terminal's width at every
redraw; when stderr is a log file, CI or nohup, a plain line about every 30 seconds.

The bar is drawn here rather than by tqdm: its line must hold the plan's own estimate of the time
left (a time budget revises the total as it goes), and no more than the width allows."""

import sys
import time
from typing import Optional

from custom_llm.terminal import say, width_of

MIN_BAR = 10         # cells: narrower lines drop words before the bar shrinks below this
REDRAW_SECONDS = 0.1
ERASE_LINE = "\r\x1b[K"   # back to the line's start, and erase what the previous, longer line left
EIGHTHS = " ▏▎▍▌▋▊▉█"


def clock(seconds: float) -> str:
    """1:05:09, 4:07, 0:09."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def short_count(n: float) -> str:
    """45.6k, 1.23M, 950."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            value = n / size
            return f"{value:.3g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"
    return f"{n:.0f}"


def bar_cells(fraction: float, cells: int, unicode: bool = True) -> str:
    """A bar `cells` wide, filled to fraction (in eighths of a cell with block characters)."""
    fraction = min(max(fraction, 0.0), 1.0)
    if not unicode:
        full = int(fraction * cells)
        return "#" * full + "-" * (cells - full)
    eighths = int(fraction * cells * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS[part] if full < cells else "")).ljust(cells)


def progress_line(step: int, total: Optional[int], loss: float, tokens_per_s: float, seconds_left: float,
                  width: int, unicode: bool = True) -> str:
    """The progress line, at most width - 1 columns (the last column is left free, so the line can
    never wrap). From the widest wording to the narrowest, the first that leaves the bar at least
    MIN_BAR cells is taken; the bar gets the rest of the line. total None: not known yet, no bar."""
    usable = width - 1
    count = f"{step}/{total}" if total else f"step {step}"
    left, tokens = f"{clock(seconds_left)} left", short_count(tokens_per_s)
    after_bar = [f" loss {loss:.4f}, {tokens_per_s:,.0f} tok/s, {left}",   # from the widest wording...
                 f" loss {loss:.4f}, {tokens} tok/s, {left}",
                 f" loss {loss:.3f} {tokens} tok/s {left}",
                 f" {loss:.3f} {tokens}/s {clock(seconds_left)}"]           # ...to the narrowest
    narrowest = (count + after_bar[-1])[:usable]   # narrower than any wording with a bar: cut to fit
    if not total:
        return next((count + words for words in after_bar if len(count + words) <= usable), narrowest)
    percent = f" {100 * step / total:3.0f}%"
    for before, words in [(count + percent, after_bar[0])] + [(count, words) for words in after_bar[1:]]:
        cells = usable - len(before) - len(" ||") - len(words)
        if cells >= MIN_BAR:
            return f"{before} |{bar_cells(step / total, cells, unicode)}|{words}"
    return narrowest


class Progress:
    """Steps done out of the plan's total (which a time budget may revise, or None while unknown),
    the loss, tokens/s and the time left. interactive: the line at the terminal; otherwise one
    plain line every `interval` seconds. width: a fixed width in columns (None: the terminal's,
    read again at every redraw, so the line follows a resized window)."""

    def __init__(self, total: Optional[int], initial: int, interactive: bool, enabled: bool = True,
                 interval: float = 30.0, stream=None, width: Optional[int] = None):
        self.enabled, self.interactive, self.interval = enabled, interactive, interval
        self.stream = stream or sys.stderr
        self.total, self.step = total, initial
        self.width = width
        self.last_line = time.time()
        self.last_draw = 0.0
        self.values = None
        self.shown = None   # the line's last values, to redraw it after a message; None: not on screen
        encoding = getattr(self.stream, "encoding", None) or "utf-8"
        try:
            "█▏".encode(encoding)
            self.unicode = True
        except (UnicodeEncodeError, LookupError):
            self.unicode = False

    def columns(self) -> int:
        return self.width or width_of(self.stream) or 80

    def update(self, step: int, total: Optional[int], loss: float, tokens_per_s: float, seconds_left: float) -> None:
        if not self.enabled:
            return
        revised = total != self.total   # a time budget revised the plan
        self.step, self.total = step, total
        if self.interactive:
            now = time.time()
            self.values = (loss, tokens_per_s, seconds_left)
            # Redraws are cheap but not free: a few a second, and always the last step.
            if revised or now - self.last_draw >= REDRAW_SECONDS or (total and step >= total):
                self.last_draw = now
                self.draw()
        elif time.time() - self.last_line >= self.interval:
            self.last_line = time.time()
            self.write(f"step {step}/{total}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
                       f"{clock(seconds_left)} left")

    def draw(self) -> None:
        line = progress_line(self.step, self.total, *self.values, width=self.columns(), unicode=self.unicode)
        self.stream.write(ERASE_LINE + line)
        self.stream.flush()
        self.shown = line

    def clear(self) -> None:
        if self.shown is not None:
            self.stream.write(ERASE_LINE)
            self.stream.flush()
            self.shown = None

    def write(self, text: str, stream=None) -> None:
        """A message between updates (validation results, epoch summaries on stdout): the line is
        taken away, the message printed (wrapped at a terminal, one line in a log), and the line
        drawn again below it."""
        if not self.enabled:
            return
        was_shown = self.shown is not None
        if self.interactive:
            self.clear()
        say(text, stream or self.stream)
        if self.interactive and was_shown:
            self.draw()

    def close(self) -> None:
        """Take the line away: what stays on screen is the messages."""
        if self.enabled and self.interactive:
            self.clear()
