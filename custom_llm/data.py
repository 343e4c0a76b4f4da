"""Training text -> token file on disk -> batches of windows.

A text of any size is read in chunks (textfile.py) and encoded straight into a uint16 token file in
one pass (the character vocabulary is discovered on the way). The token file is cached next to
the text, in .token_cache/, keyed by the text's content hash and the tokenizer, so a second run
on the same text skips all of this. Training reads the file memory-mapped: no Python work per sample.
"""

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from custom_llm.atomic import atomic_path, remove_stale_temporaries
from custom_llm.cli import UserError
from custom_llm.textfile import cache_folder, check_text_file, file_hash, read_chunks, save_quietly
from custom_llm.tokenizer import END_OF_TEXT, ChunkEncoder, tokenizer_hash

VALIDATION_FRACTION = 0.1          # the last 10% of the tokens is held out
CACHE_VERSION = 2


@dataclass
class Dataset:
    tokenizer: object
    tokens: np.ndarray      # memory-mapped, the whole text
    n_characters: int
    text_hash: str
    from_cache: bool

    @property
    def n_val(self):
        return int(len(self.tokens) * VALIDATION_FRACTION)

    @property
    def train(self):
        return self.tokens[:len(self.tokens) - self.n_val]

    @property
    def val(self):
        return self.tokens[len(self.tokens) - self.n_val:]

    @property
    def characters_per_token(self) -> float:
        return self.n_characters / len(self.tokens)


def prepare_dataset(path: str, encoding: str = "utf-8", tokenizer=None) -> Dataset:
    """Tokenize the text at path (with the given tokenizer, or a new character tokenizer built
    from it), using the on-disk cache when it holds this text and tokenizer."""
    check_text_file(path)
    text_hash = file_hash(path)
    folder = cache_folder(path)
    char_tokenizer_file = os.path.join(folder, f"{text_hash}.{encoding}.tokenizer.json")
    known = tokenizer
    if known is None and os.path.exists(char_tokenizer_file):
        known = Tokenizer.from_file(char_tokenizer_file)
    if known is not None:
        cached = _cached_tokens(folder, f"{text_hash}-{tokenizer_hash(known)}")
        if cached is not None:
            return Dataset(known, cached[0], cached[1], text_hash, from_cache=True)

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # the text's folder is read-only: work in the temporary folder, uncached
        folder = tempfile.mkdtemp(prefix="token_cache.")
    encoder = ChunkEncoder(tokenizer)
    n_tokens, n_characters = 0, 0
    # Written whole under a provisional name, then renamed once the tokenizer (part of the key) is known.
    provisional = os.path.join(folder, f"{text_hash}.partial.tokens")
    remove_stale_temporaries(provisional)
    with atomic_path(provisional) as tmp:
        with open(tmp, "wb") as out:
            for texts in _groups(read_chunks(path, encoding), 16):
                for ids in encoder.encode_many(texts):
                    out.write(ids.tobytes())
                    n_tokens += len(ids)
                n_characters += sum(len(text) for text in texts)
        if n_tokens == 0:
            raise UserError(f"{path} is empty: training needs some text")
        tokenizer = encoder.tokenizer()
        if encoder.saw_end_of_text and encoder.given is None:  # the placeholder gets its real id
            tokens = np.memmap(tmp, dtype=np.uint16, mode="r+", shape=(n_tokens,))
            tokens[tokens == ChunkEncoder.END_OF_TEXT_ID] = tokenizer.token_to_id(END_OF_TEXT)
            tokens.flush()
            del tokens
    key = f"{text_hash}-{tokenizer_hash(tokenizer)}"
    tokens_file = os.path.join(folder, f"{key}.tokens")
    os.replace(provisional, tokens_file)
    save_quietly(os.path.join(folder, f"{key}.json"), json.dumps({
        "version": CACHE_VERSION, "dtype": np.dtype(encoder.dtype).name, "n_tokens": n_tokens,
        "n_characters": n_characters}))
    if encoder.given is None:
        save_quietly(char_tokenizer_file, tokenizer.to_str())
    tokens = np.memmap(tokens_file, dtype=encoder.dtype, mode="r", shape=(n_tokens,))
    return Dataset(tokenizer, tokens, n_characters, text_hash, from_cache=False)


def _groups(items, size):
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _cached_tokens(folder, key):
    """(memory-mapped tokens, character count) from the cache, or None."""
    meta = _read_meta(os.path.join(folder, f"{key}.json"))
    tokens_file = os.path.join(folder, f"{key}.tokens")
    if not meta or not os.path.exists(tokens_file) or \
            os.path.getsize(tokens_file) != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return np.memmap(tokens_file, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],)), meta["n_characters"]


def _read_meta(meta_file):
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        return meta if meta.get("version") == CACHE_VERSION else None
    except (OSError, ValueError):
        return None


def check_split(dataset: Dataset, block_size: int, source: str) -> None:
    """Each split must hold at least one window of block_size + 1 tokens."""
    for name, part in (("training", dataset.train), ("validation", dataset.val)):
        if len(part) < block_size + 1:
            raise UserError(f"{source} is too short: its {name} part has {len(part)} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a longer text (about "
                            f"{(block_size + 1) * 10} characters at least) or a smaller block_size")


def random_offsets(generator: np.random.Generator, n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """Starts of `count` windows at random: every overlapping chunk of the text can occur."""
    return generator.integers(0, n_tokens - block_size, size=count)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, block_size: int, device="cpu"):
    """(inputs, targets) for the windows starting at offsets, gathered in one go."""
    window = torch.from_numpy(tokens[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))
    if device != "cpu":
        window = window.pin_memory().to(device, non_blocking=True)
    return window[:, :-1], window[:, 1:]
