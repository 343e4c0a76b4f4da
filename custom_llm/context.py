"""The context rule, one for the whole project: the model never sees more than block_size tokens.

A prompt longer than that keeps its last block_size tokens. When generation fills the window, the
older half is dropped at once (as llama.cpp's context shift does), so the window is re-read once
every block_size // 2 tokens instead of for every new token. PyTorch's generate() (model.py) and
the llama.cpp runtime (runtime.py) both follow it, so their greedy texts are equal, however long.
No torch here: inference imports this without it.
"""


def tokens_kept_on_shift(block_size: int) -> int:
    return max(1, block_size // 2)


def fit_prompt(tokens: list, block_size: int) -> list:
    """The window a prompt starts with."""
    return list(tokens[-block_size:])


def slide(window: list, block_size: int) -> list:
    """The window after a new token was appended to it."""
    if len(window) <= block_size:
        return window
    return window[-tokens_kept_on_shift(block_size):]
