"""Training text -> token arrays -> batches of windows."""

import os

import numpy as np
import torch

from custom_llm.cli import UserError

VALIDATION_FRACTION = 0.1  # the last 10% of the text is held out


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The whole text of a training file, or a one-line error saying what is wrong with it."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: give the path of a text file with --dataset_path", 2)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: give the path of a text file with --dataset_path", 2)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        raise UserError(f"{path} is not readable (permission denied): check its permissions") from None
    if not data.strip():
        raise UserError(f"{path} is empty: training needs some text")
    if b"\x00" in data[:8192] and encoding.lower().replace("-", "") == "utf8":
        raise UserError(f"{path} looks like a binary file (it has NUL bytes), not text")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not valid {encoding}: bad byte 0x{data[err.start]:02x} at byte offset "
                        f"{err.start}; convert it to UTF-8 or pass --encoding (e.g. latin-1)") from None
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}", 2) from None


def split(tokens: np.ndarray, block_size: int, source: str = "the text"):
    """(train, val) token arrays: the last 10% is validation. Each must hold one window."""
    n_val = int(len(tokens) * VALIDATION_FRACTION)
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) < block_size + 1:
            raise UserError(f"{source} is too short: its {name} part has {len(part)} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a longer text (about "
                            f"{(block_size + 1) * 10} characters at least) or a smaller block_size")
    return train, val


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: np.random.Generator,
              device="cpu"):
    """Windows at random offsets (every overlapping chunk can occur), gathered in one go."""
    offsets = generator.integers(0, len(tokens) - block_size, size=batch_size)
    window = tokens[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
    batch = torch.from_numpy(window)
    if device != "cpu":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]
