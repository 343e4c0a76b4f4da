"""What a run trains on, whatever kind of data it is: the Dataset interface that the training loop,
the evaluation and the export checks ask, and the kinds of data (text_data.py, chat_data.py).

The kind is decided once, from the documents found (corpus.py): the first kind in KINDS that
claims the corpus. Nothing after that asks which kind it has; a third kind is one more module
with the same three functions:

    claims(corpus) -> bool                       these documents are of this kind
    prepare(corpus, tokenizer, config) -> Dataset   tokenized (with a new tokenizer when None)
    held_out(corpus, tokenizer, config) -> HeldOut  what training held out, for the export checks
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from custom_llm.corpus import Corpus

IGNORED = -1   # the target of a position that is not trained on (model.py's loss skips it)


@dataclass
class Dataset:
    """Training and validation data of one kind, cut in rows of sequence_length tokens (a training
    example: architectures.sequence_length, the block or several windows of it). The fields are
    what every kind has; the methods are what each kind answers in its own way."""
    tokenizer: object
    corpus: Corpus          # the documents, their manifest and which are held out
    sequence_length: int    # tokens of a row's inputs
    n_characters: int
    from_cache: bool        # its tokens came from the token cache
    notes: list = field(default_factory=list)    # lines for the user after the description
    made: list = field(default_factory=list)     # and before it: the tokenizer made for the run
    # Only some positions are targets (a chat's answers): more windows per step pay off
    # (training.auto_batch_size).
    sparse_targets = False

    @property
    def text_hash(self) -> str:
        return self.corpus.key

    @property
    def characters_per_token(self) -> float:
        return self.n_characters / max(1, self.n_tokens)

    @property
    def saved_with_model(self) -> dict:
        """Config entries the model keeps from its data (a chat model's template)."""
        return {}

    def report(self) -> list:
        """The lines the run starts with: the tokenizer made, the description, the notes."""
        return self.made + [self.describe()] + self.notes

    # Each kind's own answers.
    @property
    def n_tokens(self) -> int:
        """Tokens of both parts (for characters per token)."""
        raise NotImplementedError

    @property
    def n_train_tokens(self) -> int:
        """Tokens an epoch trains on."""
        raise NotImplementedError

    @property
    def val_source(self) -> str:
        """Where the validation part comes from, for messages."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line: what was read and how it was split (the run's start-up line)."""
        raise NotImplementedError

    def check_fits(self) -> None:
        """A UserError unless each part holds at least one row."""
        raise NotImplementedError

    def draw(self, split: str, generator: np.random.Generator, count: int) -> np.ndarray:
        """`count` rows of split ("train" or "val") at random, as offsets for batch()."""
        raise NotImplementedError

    def batch(self, split: str, offsets: np.ndarray, device="cpu"):
        """(inputs, targets) of the rows at offsets, each (len(offsets), sequence_length) int64;
        targets of positions not trained on are IGNORED."""
        raise NotImplementedError


@dataclass
class HeldOut:
    """What training held out, for convert_to_gguf.py's checks and report."""
    tokens: list                            # one sequence of token ids
    source: str                             # where they come from, for messages
    conversations: Optional[list] = None    # a chat model's held-out conversations, to answer


def kinds() -> list:
    """The kinds of data, most particular first: the last one (text) claims everything."""
    from custom_llm import chat_data, text_data
    return [chat_data, text_data]


def kind_of(corpus: Corpus):
    return next(kind for kind in kinds() if kind.claims(corpus))


def prepare(corpus: Corpus, tokenizer, config: dict) -> Dataset:
    """The corpus as its kind's Dataset, with the given tokenizer, or a new one of the config's
    kind (config["tokenizer"]: char or bpe, of config["vocab_size_requested"] tokens)."""
    return kind_of(corpus).prepare(corpus, tokenizer, config)


def held_out(corpus: Corpus, tokenizer, config: dict) -> HeldOut:
    return kind_of(corpus).held_out(corpus, tokenizer, config)
