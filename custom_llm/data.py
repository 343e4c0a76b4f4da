"""Training text -> token file on disk -> batches of windows.

A text of any size is read in chunks: one pass hashes it (and, for a new tokenizer, collects its
characters), a second encodes it straight into a uint16 token file. The token file is cached
next to the text, keyed by the text's content hash and the tokenizer, so a second run on the same
text skips all of this. Training reads the file memory-mapped: no Python work per sample.
"""

import codecs
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from custom_llm.cli import UserError, atomic_path
from custom_llm.tokenizer import (END_OF_TEXT, build_char_tokenizer, char_lookup_table, encode)

VALIDATION_FRACTION = 0.1          # the last 10% of the tokens is held out
CHUNK_BYTES = 16 << 20             # bytes read at a time; bounds the working memory
CACHE_VERSION = 1


def check_text_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: give the path of a text file with --dataset_path", 2)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: give the path of a text file with --dataset_path", 2)
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} is not readable (permission denied): check its permissions")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty: training needs some text")


def read_chunks(path: str, encoding: str = "utf-8"):
    """Yield the text chunk by chunk. Chunks end after a newline where there is one, so a
    multi-character token such as <|endoftext|> is never cut in two."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}", 2) from None
    carry, offset = "", 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                if offset == 0 and b"\x00" in raw[:8192] and encoding.lower().replace("-", "") == "utf8":
                    raise UserError(f"{path} looks like a binary file (it has NUL bytes), not text")
                try:
                    text = carry + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as err:
                    pending = len(decoder.getstate()[0]) if raw else 0
                    position = offset - pending + err.start
                    raise UserError(f"{path} is not valid {encoding}: bad byte at byte offset {position}; "
                                    "convert it to UTF-8 or pass --encoding (e.g. latin-1)") from None
                offset += len(raw)
                if not raw:
                    if text:
                        yield text
                    return
                cut = text.rfind("\n") + 1 or max(0, len(text) - len(END_OF_TEXT))
                carry, text = text[cut:], text[:cut]
                if text:
                    yield text
    except PermissionError:
        raise UserError(f"{path} is not readable (permission denied): check its permissions") from None


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


def file_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    return hashlib.blake2b(tokenizer.to_str().encode(), digest_size=8).hexdigest()


def cache_folder(text_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(text_path)), ".token_cache")


def prepare_dataset(path: str, encoding: str = "utf-8", tokenizer=None, progress=None) -> Dataset:
    """Tokenize the text at path (with the given tokenizer, or a new character tokenizer built
    from it), using the on-disk cache when it holds this text and tokenizer."""
    from tokenizers import Tokenizer
    check_text_file(path)
    text_hash = file_hash(path)
    folder = cache_folder(path)
    char_tokenizer_file = os.path.join(folder, f"{text_hash}.{encoding}.tokenizer.json")
    if tokenizer is None and os.path.exists(char_tokenizer_file):
        tokenizer = Tokenizer.from_file(char_tokenizer_file)
    if tokenizer is None:
        seen = np.zeros(0x110000, dtype=bool)
        for text in read_chunks(path, encoding):
            seen[_codepoints(text)] = True
            if progress:
                progress(len(text))
        tokenizer = build_char_tokenizer(chr(c) for c in np.flatnonzero(seen))
        _save_quietly(char_tokenizer_file, tokenizer.to_str())

    key = f"{text_hash}-{tokenizer_hash(tokenizer)}"
    tokens_file = os.path.join(folder, f"{key}.tokens")
    meta_file = os.path.join(folder, f"{key}.json")
    meta = _read_meta(meta_file)
    if meta and os.path.exists(tokens_file):
        tokens = np.memmap(tokens_file, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        return Dataset(tokenizer, tokens, meta["n_characters"], text_hash, from_cache=True)

    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.uint32
    table = char_lookup_table(tokenizer)
    n_tokens, n_characters = 0, 0
    try:
        os.makedirs(folder, exist_ok=True)
        target = tokens_file
    except OSError:  # the text's folder is read-only: work without a cache
        target = os.path.join(tempfile.gettempdir(), f"{key}.tokens")
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for text in read_chunks(path, encoding):
                ids = _encode_chunk(tokenizer, table, text, dtype)
                out.write(ids.tobytes())
                n_tokens += len(ids)
                n_characters += len(text)
                if progress:
                    progress(len(text))
    if n_tokens == 0:
        raise UserError(f"{path} is empty: training needs some text")
    if target == tokens_file:
        _save_quietly(meta_file, json.dumps({"version": CACHE_VERSION, "dtype": np.dtype(dtype).name,
                                             "n_tokens": n_tokens, "n_characters": n_characters}))
    tokens = np.memmap(target, dtype=dtype, mode="r", shape=(n_tokens,))
    return Dataset(tokenizer, tokens, n_characters, text_hash, from_cache=False)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _encode_chunk(tokenizer, table, text, dtype):
    """Characters the tokenizer has as single tokens go through a lookup table; a chunk with
    anything else (unseen characters, <|endoftext|>) goes through the full tokenizer."""
    if END_OF_TEXT not in text:
        ids = table[_codepoints(text)]
        if (ids >= 0).all():
            return ids.astype(dtype)
    return np.array(encode(tokenizer, text), dtype=dtype)


def _read_meta(meta_file):
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        return meta if meta.get("version") == CACHE_VERSION else None
    except (OSError, ValueError):
        return None


def _save_quietly(path, content):
    """Cache files are an optimisation: failing to write one is not an error."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)
    except (OSError, UserError):
        pass


def check_split(dataset: Dataset, block_size: int, source: str) -> None:
    """Each split must hold at least one window of block_size + 1 tokens."""
    for name, part in (("training", dataset.train), ("validation", dataset.val)):
        if len(part) < block_size + 1:
            raise UserError(f"{source} is too short: its {name} part has {len(part)} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a longer text (about "
                            f"{(block_size + 1) * 10} characters at least) or a smaller block_size")


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: np.random.Generator,
              device="cpu"):
    """Windows at random offsets (every overlapping chunk can occur), gathered in one go."""
    offsets = generator.integers(0, len(tokens) - block_size, size=batch_size)
    window = torch.from_numpy(tokens[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))
    if device != "cpu":
        window = window.pin_memory().to(device, non_blocking=True)
    return window[:, :-1], window[:, 1:]
