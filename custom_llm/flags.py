"""Every numeric flag of the four scripts with its range, in one table.

The scripts' flags, the questions of llm_model.py and train_llm.py, and inference_gguf.py's
/commands all parse numbers through this table, so a value is checked the same way wherever it
is given, and --help and the errors state the same range. No torch here: inference imports it.
"""

import math
from dataclasses import dataclass
from typing import Optional


def parse_number(text: str, kind=float):
    """int or float from text, or ValueError with a reason a user can read."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{text} must be a finite number")
    return value


@dataclass(frozen=True)
class Number:
    kind: type                  # int or float
    low: Optional[float]        # None: no bound
    high: Optional[float]
    meaning: str                # --help and /help
    low_open: bool = False      # True: low itself is outside the range
    high_open: bool = False
    note: str = ""              # what a special value means, e.g. "0: greedy"

    def parse(self, text) -> float:
        """The value of text, or ValueError(reason) when it is not a number in the range."""
        value = parse_number(str(text), self.kind)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ValueError(f"{text} must be {self.describe()}")
        return value

    def describe(self) -> str:
        """The range in words: 'a positive whole number', 'a number at least 0 and below 1'."""
        whole = self.kind is int
        if self.high is None and ((self.low == 0 and self.low_open) or (whole and self.low == 1)):
            words = "a positive whole number" if whole else "a positive number"
        else:
            bounds = []
            if self.low is not None:
                bounds.append(f"{'above' if self.low_open else 'at least'} {_show(self.low)}")
            if self.high is not None:
                bounds.append(f"{'below' if self.high_open else 'at most'} {_show(self.high)}")
            words = f"{'a whole number' if whole else 'a number'} {' and '.join(bounds)}"
        return f"{words} ({self.note})" if self.note else words


def _show(bound) -> str:
    if bound == 2 ** 63 - 1:
        return "2**63 - 1"
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


NUMBERS = {
    # llm_model.py: the model's shape
    "n_embd": Number(int, 1, None, "embedding size"),
    "n_head": Number(int, 1, None, "attention heads (must divide n_embd)"),
    "n_layer": Number(int, 1, None, "transformer blocks"),
    "block_size": Number(int, 1, None, "context length in tokens"),
    "dropout": Number(float, 0, 1, "dropout probability", high_open=True),
    "train_windows": Number(int, 1, None, "windows of block_size in one training row (windowed models)"),
    # train_llm.py
    "batch_size": Number(int, 1, None, "windows per step and process"),
    "learning_rate": Number(float, 0, None, "peak learning rate", low_open=True),
    "max_epochs": Number(int, 1, None, "passes over the training text"),
    "max_steps": Number(int, 1, None, "stop after this many steps (quick trials)"),
    "minutes": Number(float, 0, None, "train for this long: the plan (warmup, decay, last validation and "
                      "save) is fitted to the time", low_open=True),
    "memory_gb": Number(float, 0, None, "memory budget of training in GB: each process's batch runs in "
                        "micro-batches that fit it (same result)", low_open=True),
    "seed": Number(int, 0, 2 ** 63 - 1, "random seed: the same seed and settings give the same result"),
    "eval_interval": Number(int, 1, None, "steps between validation runs (also at the end of every epoch)"),
    "eval_batches": Number(int, 1, None, "batches of batch_size windows per validation run"),
    "warmup_steps": Number(int, 0, None, "steps of linear learning-rate warmup"),
    "min_lr_ratio": Number(float, 0, 1, "the schedule decays to the peak learning rate times this"),
    "weight_decay": Number(float, 0, None, "weight decay of the matrices"),
    "grad_clip": Number(float, 0, None, "clip the gradients' norm to this", note="0: no clipping"),
    "grad_accum_steps": Number(int, 1, None, "micro-batches per step: the same effective batch on fewer processes"),
    "checkpoint_interval": Number(int, 1, None, "save a checkpoint every N steps"),
    "checkpoint_minutes": Number(float, 0, None, "and whenever this many minutes passed since the last one",
                                 low_open=True),
    # convert_to_gguf.py
    "eval_tokens": Number(int, 0, None, "held-out tokens the report evaluates", note="0: all of them"),
    # inference_gguf.py (and PyTorch generate())
    "temperature": Number(float, 0, None, "sampling temperature", note="0: greedy"),
    "top_k": Number(int, 1, None, "keep the N likeliest tokens"),
    "top_p": Number(float, 0, 1, "keep the likeliest tokens up to probability F", low_open=True),
    "min_p": Number(float, 0, 1, "drop tokens below F times the likeliest one's probability"),
    "repeat_penalty": Number(float, 0, None, "divide the odds of recently seen tokens by F", low_open=True,
                             note="1: off, 1.1 to 1.3 is usual"),
    "repeat_last_n": Number(int, 1, None, "how many recent tokens the penalty sees"),
    "max_tokens": Number(int, 1, None, "tokens to generate at most"),
    "threads": Number(int, 1, None, "CPU threads"),
}
