"""Text as training data (data.py's text kind), the last step of the text's way (corpus.py lists
them all): the tokens, their training and validation parts, and random windows from them.

A text of any size, or documents joined with <|endoftext|>, ends as one token file on disk
(tokens_cache.py), read memory-mapped: no Python work per sample. Its validation part is the last
10% of the tokens, or the held-out documents, placed last (corpus.py). Any row of sequence_length
+ 1 tokens is a training example: its first sequence_length tokens in, each next token a target
(sequence_length: the block for GPT-2, several windows of it for a windowed model).
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from custom_llm.architectures import sequence_length
from custom_llm.corpus import Corpus, spec_text
from custom_llm.data import Dataset, HeldOut
from custom_llm.errors import UserError
from custom_llm.tokens_cache import bpe_tokenizer_for, token_file_for

VALIDATION_FRACTION = 0.1          # one text (or a few documents): the last 10% of the tokens is held out


@dataclass
class TextDataset(Dataset):
    tokens: np.ndarray = None   # memory-mapped, the whole text: training part, then validation part
    n_held_out: int = None      # tokens of the held-out documents, last in tokens; None: the last 10%
    seconds: float = 0.0        # to prepare it

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
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_train_tokens(self) -> int:
        return len(self.train)

    @property
    def val_source(self) -> str:
        if self.n_held_out is not None:
            return f"the {len(self.corpus.held_out)} held-out files of {spec_text(self.corpus.spec)}"
        return f"the last 10% of {spec_text(self.corpus.spec)}"

    def describe(self) -> str:
        corpus = self.corpus
        return (f"Text: {corpus.describe()}{self.n_characters:,} characters -> {len(self.train):,} training and "
                f"{len(self.val):,} validation tokens" + ("" if corpus.single else f" ({corpus.validation_rule()})")
                + f", {self.characters_per_token:.2f} characters per token"
                + (" (from the token cache)" if self.from_cache else f" (prepared in {self.seconds:.1f}s)"))

    def check_fits(self) -> None:
        """Each part must hold at least one row of sequence_length + 1 tokens."""
        n = self.sequence_length + 1
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) < n:
                raise UserError(f"{spec_text(self.corpus.spec)} is too short: its {name} part has {len(part)} "
                                f"tokens, fewer than a training row's {n} (the sequence length + 1); use a longer "
                                f"text (about {n * 10} characters at least) or a smaller block_size")

    def draw(self, split, generator, count):
        """Starts of overlapping windows."""
        return generator.integers(0, len(self._part(split)) - self.sequence_length, size=count)

    def batch(self, split, offsets, device="cpu"):
        window = self._part(split)[offsets[:, None] + np.arange(self.sequence_length + 1)]
        window = torch.from_numpy(window.astype(np.int64))
        return to_device(window[:, :-1], window[:, 1:], device)

    def _part(self, split: str):
        return {"train": self.train, "val": self.val}[split]


def to_device(inputs, targets, device):
    if device != "cpu":
        inputs = inputs.pin_memory().to(device, non_blocking=True)
        targets = targets.pin_memory().to(device, non_blocking=True)
    return inputs, targets


def text_dataset(corpus: Corpus, tokenizer=None, sequence_length: int = 1) -> TextDataset:
    """The corpus's tokens with the given tokenizer, or a new character tokenizer built from its
    text, from the token cache when it holds them."""
    started = time.time()
    tokens = token_file_for(corpus, tokenizer)
    return TextDataset(tokens.tokenizer, corpus, sequence_length, tokens.n_characters, tokens.from_cache,
                       notes=corpus.notes() + tokens.notes, tokens=tokens.tokens, n_held_out=tokens.n_held_out,
                       seconds=time.time() - started)


# ------------------------------------------------------------------ the kind (data.py)

def claims(corpus: Corpus) -> bool:
    return True   # whatever no other kind claims is text


def prepare(corpus: Corpus, tokenizer, config: dict) -> TextDataset:
    """The text's dataset; with no tokenizer given, a new one of the config's kind: a BPE trained
    on the text (cached per text and size), or the characters found while encoding it."""
    made = []
    if tokenizer is None and config.get("tokenizer") == "bpe":
        started = time.time()
        tokenizer, cached = bpe_tokenizer_for(corpus, config["vocab_size_requested"])
        made.append(f"BPE tokenizer: {tokenizer.get_vocab_size()} tokens" +
                    (" (from the token cache)" if cached else f", trained in {time.time() - started:.1f}s"))
    dataset = text_dataset(corpus, tokenizer, sequence_length(config))
    dataset.made += made
    return dataset


def held_out(corpus: Corpus, tokenizer, config: dict) -> HeldOut:
    dataset = text_dataset(corpus, tokenizer, sequence_length(config))
    return HeldOut(dataset.val.tolist(), dataset.val_source)
