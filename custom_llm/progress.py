"""What a training run shows while it runs: a progress bar at a terminal, and a plain line about
every 30 seconds when stderr is a log file, CI or nohup (where a bar would print nothing useful)."""

import sys
import time

from tqdm import tqdm


def clock(seconds: float) -> str:
    """1:05:09, 4:07, 0:09."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Steps done out of the plan's total (which a time budget may revise), the loss, tokens/s and
    the time left. interactive: a tqdm bar; otherwise one line every `interval` seconds."""

    def __init__(self, total: int, initial: int, interactive: bool, enabled: bool = True,
                 interval: float = 30.0, stream=None):
        self.enabled, self.interactive, self.interval = enabled, interactive, interval
        self.stream = stream or sys.stderr
        self.total = total
        self.last_line = time.time()
        # Drawn from the first update on, so that it does not stand above the start-up lines.
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                        disable=not (enabled and interactive), file=self.stream, delay=1e-9)

    def update(self, step: int, total: int, loss: float, tokens_per_s: float, seconds_left: float) -> None:
        if not self.enabled:
            return
        if total != self.total:   # a time budget revised the plan
            self.total = self.bar.total = total
            self.bar.refresh()
        if self.interactive:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s, {clock(seconds_left)} left")
        elif time.time() - self.last_line >= self.interval:
            self.last_line = time.time()
            self.write(f"step {step}/{total}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
                       f"{clock(seconds_left)} left")

    def write(self, text: str, stream=None) -> None:
        """A line between bar updates (validation results, epoch summaries on stdout), or plainly
        in a log."""
        if not self.enabled:
            return
        if self.interactive:
            self.bar.write(text, file=stream or self.stream)
        else:
            print(text, file=stream or self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()
