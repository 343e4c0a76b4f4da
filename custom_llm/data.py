"""The last step of the text's way (corpus.py lists them all): the Dataset, its training and
validation tokens, and random batches of windows from them.

A text of any size, or documents joined with <|endoftext|>, ends as one token file on disk
(tokens_cache.py), read memory-mapped: no Python work per sample. Its validation part is the last
10% of the tokens, or the held-out documents, placed last (corpus.py).
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from custom_llm.corpus import Corpus, spec_text
from custom_llm.errors import UserError
from custom_llm.tokens_cache import token_file_for

VALIDATION_FRACTION = 0.1          # one text (or a few documents): the last 10% of the tokens is held out


@dataclass
class Dataset:
    tokenizer: object
    tokens: np.ndarray      # memory-mapped, the whole text: training part, then validation part
    n_characters: int
    corpus: Corpus          # the documents, their manifest and which are held out
    n_held_out: int         # tokens of the held-out documents, last in tokens; None: the last 10%
    from_cache: bool
    notes: list = field(default_factory=list)   # lines for the user: where the cache is, what was rebuilt

    @property
    def text_hash(self) -> str:
        return self.corpus.key

    @property
    def n_val(self):
        if self.n_held_out is not None:
            return self.n_held_out
        return int(len(self.tokens) * VALIDATION_FRACTION)

    @property
    def train(self):
        return self.tokens[:len(self.tokens) - self.n_val]

    @property
    def val(self):
        return self.tokens[len(self.tokens) - self.n_val:]

    @property
    def val_source(self) -> str:
        """Where the validation tokens come from, for messages."""
        if self.n_held_out is not None:
            return f"the {len(self.corpus.held_out)} held-out files of {spec_text(self.corpus.spec)}"
        return f"the last 10% of {spec_text(self.corpus.spec)}"

    @property
    def characters_per_token(self) -> float:
        return self.n_characters / len(self.tokens)


def prepare_dataset(corpus: Corpus, tokenizer=None) -> Dataset:
    """The corpus's tokens with the given tokenizer, or a new character tokenizer built from its
    text, from the token cache when it holds them."""
    tokens = token_file_for(corpus, tokenizer)
    return Dataset(tokens.tokenizer, tokens.tokens, tokens.n_characters, corpus, tokens.n_held_out,
                   tokens.from_cache, notes=corpus.notes() + tokens.notes)


def check_split(dataset: Dataset, block_size: int, source: str) -> None:
    """Each split must hold at least one window of block_size + 1 tokens."""
    if isinstance(dataset.train, PackedConversations):
        return   # conversations: each part has at least one (conversations.py)
    for name, part in (("training", dataset.train), ("validation", dataset.val)):
        if len(part) < block_size + 1:
            raise UserError(f"{source} is too short: its {name} part has {len(part)} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a longer text (about "
                            f"{(block_size + 1) * 10} characters at least) or a smaller block_size")


@dataclass
class PackedConversations:
    """Conversations packed into windows of block_size + 1 tokens (conversations.py): a training or
    validation part of a chat Dataset. Only the target positions (the answers) are trained on."""
    windows: np.ndarray         # (n, block_size + 1) token ids
    targets: np.ndarray         # (n, block_size + 1) bool: this token is an answer's, to be predicted
    n_conversations: int
    n_cut: int                  # conversations longer than a window, cut to fit

    def __len__(self) -> int:   # tokens, as for text: an epoch is every window once
        return self.windows.shape[0] * (self.windows.shape[1] - 1)


IGNORED = -1   # the target of a position that is not trained on (model.py's cross-entropy skips it)


def random_offsets(generator: np.random.Generator, part, block_size: int, count: int) -> np.ndarray:
    """`count` windows at random: starts of overlapping chunks of a text, or indices of packed
    conversation windows."""
    if isinstance(part, PackedConversations):
        return generator.integers(0, part.windows.shape[0], size=count)
    return generator.integers(0, len(part) - block_size, size=count)


def get_batch(part, offsets: np.ndarray, block_size: int, device="cpu"):
    """(inputs, targets) for the windows at offsets, gathered in one go; a packed conversation's
    targets are IGNORED but for its answers."""
    if isinstance(part, PackedConversations):
        window = torch.from_numpy(part.windows[offsets].astype(np.int64))
        targets = torch.from_numpy(np.where(part.targets[offsets, 1:], part.windows[offsets, 1:], IGNORED)
                                   .astype(np.int64))
    else:
        window = torch.from_numpy(part[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))
        targets = window[:, 1:]
    if device != "cpu":
        window = window.pin_memory().to(device, non_blocking=True)
        targets = targets.pin_memory().to(device, non_blocking=True)
    return window[:, :-1], targets
