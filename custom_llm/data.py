"""Training text -> token file on disk -> batches of windows.

A text of any size, or documents joined with <|endoftext|> (corpus.py), is read in chunks
(textfile.py) and encoded straight into a uint16 token file in one pass (the character vocabulary
is discovered on the way). The token file is cached (cache.py: beside the text in .token_cache/,
or in the user's cache folder), keyed by the text's content hash (for documents, their manifest's)
and the tokenizer, and checked against its own content hash when it is read, so a second run on
the same text skips all of this and a damaged cache file is rebuilt, never trained on. Training
reads the file memory-mapped: no Python work per sample.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from custom_llm.atomic import atomic_path, remove_stale_temporaries
from custom_llm.cache import digest, load_checked, save_checked, token_cache_folder, touch, trim
from custom_llm.errors import UserError
from custom_llm.corpus import Corpus, find_documents, spec_text
from custom_llm.textfile import CHUNK_BYTES
from custom_llm.tokenizer import END_OF_TEXT, ChunkEncoder, tokenizer_from_cache, tokenizer_hash

VALIDATION_FRACTION = 0.1          # one text (or a few documents): the last 10% of the tokens is held out
CACHE_VERSION = 3
GROUP_CHARACTERS = 16 * CHUNK_BYTES  # text encoded per batch: 16 full chunks, or many small documents


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


def prepare_dataset(spec, encoding: str = "utf-8", tokenizer=None) -> Dataset:
    """Tokenize the text or documents spec names (corpus.py) with the given tokenizer, or a new
    character tokenizer built from them, using the on-disk cache when it holds this text and tokenizer."""
    corpus = find_documents(spec, encoding)
    text_hash = corpus.key
    folder, where = token_cache_folder(corpus.folder)
    notes = ([where] if where else []) + corpus.notes()
    char_tokenizer_file = os.path.join(folder, f"{text_hash}.{encoding}.tokenizer.json")
    known = tokenizer if tokenizer is not None else tokenizer_from_cache(char_tokenizer_file)
    if known is not None:
        cached = _cached_tokens(folder, f"{text_hash}-{tokenizer_hash(known)}", notes)
        if cached is not None:
            tokens, meta = cached
            return Dataset(known, tokens, meta["n_characters"], corpus, meta.get("n_held_out"), from_cache=True,
                           notes=notes)

    encoder = ChunkEncoder(tokenizer)
    n_tokens, n_characters, hasher = 0, 0, hashlib.sha256()
    part_ends = []   # tokens written at the end of each part: the training documents, the held-out ones
    # Written whole under a provisional name, then renamed once the tokenizer (part of the key) is known.
    provisional = os.path.join(folder, f"{text_hash}.partial.tokens")
    remove_stale_temporaries(provisional)
    with atomic_path(provisional) as tmp:
        with open(tmp, "wb") as out:
            for part in corpus.parts():
                for texts in _groups(part, 16, GROUP_CHARACTERS):
                    for ids in encoder.encode_many(texts):
                        data = ids.tobytes()
                        out.write(data)
                        if encoder.saw_end_of_text and encoder.given is None:
                            hasher = None   # placeholders to be given their id: hashed after that
                        elif hasher:
                            hasher.update(data)
                        n_tokens += len(ids)
                    n_characters += sum(len(text) for text in texts)
                part_ends.append(n_tokens)
        if n_tokens == 0:
            raise UserError(f"{spec_text(spec)} is empty: training needs some text")
        tokenizer = encoder.tokenizer()
        if encoder.saw_end_of_text and encoder.given is None:  # the placeholder gets its real id
            tokens = np.memmap(tmp, dtype=np.uint16, mode="r+", shape=(n_tokens,))
            for start in range(0, n_tokens, 16 * CHUNK_BYTES):   # a block at a time: no text-sized mask
                block = tokens[start:start + 16 * CHUNK_BYTES]
                # By index, not by mask: ten times faster, as the placeholders are few.
                block[np.flatnonzero(block == ChunkEncoder.END_OF_TEXT_ID)] = tokenizer.token_to_id(END_OF_TEXT)
            tokens.flush()
            del tokens
        tokens_digest = hasher.hexdigest() if hasher else digest(tmp)
    n_characters -= corpus.separator_characters   # the <|endoftext|> between documents is no text of theirs
    n_held_out = n_tokens - part_ends[0] if len(part_ends) == 2 else None
    key = f"{text_hash}-{tokenizer_hash(tokenizer)}"
    tokens_file = os.path.join(folder, f"{key}.tokens")
    os.replace(provisional, tokens_file)
    save_checked(os.path.join(folder, f"{key}.json"), json.dumps({
        "version": CACHE_VERSION, "dtype": np.dtype(encoder.dtype).name, "n_tokens": n_tokens,
        "n_characters": n_characters, "n_held_out": n_held_out, "sha256": tokens_digest}))
    if encoder.given is None:
        save_checked(char_tokenizer_file, tokenizer.to_str())
    trim(folder, keep=text_hash)
    tokens = np.memmap(tokens_file, dtype=encoder.dtype, mode="r", shape=(n_tokens,))
    return Dataset(tokenizer, tokens, n_characters, corpus, n_held_out, from_cache=False, notes=notes)


def _groups(texts, size, characters):
    """Lists of texts to encode together: `size` of them (16 chunks of a large file), or as many
    as make `characters` (small documents: one tokenizer call for many, not one each)."""
    group, length = [], 0
    for text in texts:
        group.append(text)
        length += len(text)
        if length >= characters or (len(group) >= size and length >= characters // 16):
            yield group
            group, length = [], 0
    if group:
        yield group


def _cached_tokens(folder, key, notes):
    """(memory-mapped tokens, character count) from the cache, or None. A token file whose
    content does not match the hash saved with it is not used (and a note says so)."""
    meta_file, tokens_file = os.path.join(folder, f"{key}.json"), os.path.join(folder, f"{key}.tokens")
    meta = _read_meta(meta_file)
    if meta is None or not os.path.exists(tokens_file):
        return None
    if os.path.getsize(tokens_file) != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize \
            or digest(tokens_file) != meta["sha256"]:
        notes.append(f"note: the cached tokens {tokens_file} do not match their saved hash: prepared again")
        return None
    touch(meta_file, tokens_file)
    return np.memmap(tokens_file, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],)), meta


def _read_meta(meta_file):
    content = load_checked(meta_file)
    try:
        meta = json.loads(content) if content else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == CACHE_VERSION else None


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
