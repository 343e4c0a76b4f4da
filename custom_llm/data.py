"""Training text -> token file on disk -> batches of windows.

A text of any size is read in chunks and encoded straight into a uint16 token file in one pass
(the character vocabulary is discovered on the way). The token file is cached next to the text,
in .token_cache/, keyed by the text's content hash and the tokenizer, so a second run on the same
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

from custom_llm.cli import UserError, atomic_path, remove_stale_temporaries
from custom_llm.tokenizer import END_OF_TEXT, build_char_tokenizer, char_lookup_table, encode

VALIDATION_FRACTION = 0.1          # the last 10% of the tokens is held out
CHUNK_BYTES = 1 << 20              # bytes read at a time: small chunks stay in the CPU cache (measured fastest)
CACHE_VERSION = 2


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
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}", 2) from None
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    carry, offset = b"", 0  # offset: where the next decoded piece starts in the file
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                if offset == 0 and utf8 and b"\x00" in raw[:8192]:
                    raise UserError(f"{path} looks like a binary file (it has NUL bytes), not text")
                if not utf8:  # any other encoding: its incremental decoder finds the boundaries
                    text = _decode(decoder, raw, not raw, path, encoding, offset)
                    offset += len(raw)
                    if text:
                        yield text
                    if not raw:
                        return
                    continue
                # UTF-8: a newline byte is never part of a longer character, so cut after a
                # newline and decode whole pieces; the rest waits for the next read.
                data = carry + raw
                cut = _safe_cut(data) if raw else len(data)
                if cut == 0 and len(data) < 16 * CHUNK_BYTES:
                    carry = data  # no safe cut yet: read on
                    continue
                if cut == 0:  # one enormous line: cut anywhere outside a character
                    cut = len(data) - 1
                    while cut > 0 and (data[cut] & 0xC0) == 0x80:
                        cut -= 1
                if cut:
                    yield _decode(decoder, data[:cut], True, path, encoding, offset)
                offset += cut
                carry = data[cut:]
                if not raw:
                    return
    except PermissionError:
        raise UserError(f"{path} is not readable (permission denied): check its permissions") from None


SPACE_BYTES = b" \t\n\r\x0b\x0c"


def _safe_cut(data: bytes) -> int:
    """A cut point where no tokenizer's pre-tokenization (GPT-2's, which splits off whitespace
    runs and joins one space to the word after it) can join anything across: just after a lone
    newline between two non-space bytes, or else just before a lone space. 0 when there is none."""
    for separator, after in ((b"\n", 1), (b" ", 0)):
        position = len(data)
        while (position := data.rfind(separator, 0, position)) > 0:
            if position + 1 < len(data) and data[position - 1] not in SPACE_BYTES \
                    and data[position + 1] not in SPACE_BYTES:
                return position + after
    return 0


def _decode(decoder, data, final, path, encoding, offset):
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not valid {encoding}: bad byte at byte offset {offset + err.start}; "
                        "convert it to UTF-8 or pass --encoding (e.g. latin-1)") from None


class ChunkEncoder:
    """Encodes text chunk by chunk into a compact id array with numpy lookups. Given no
    tokenizer, it builds the character tokenizer on the way: each new character gets the next id,
    so one pass over the text both discovers the vocabulary and encodes it."""

    UNKNOWN = np.iinfo(np.uint16).max          # a character without an id (yet)
    END_OF_TEXT_ID = UNKNOWN - 1               # placeholder until the final id is known

    def __init__(self, tokenizer=None):
        self.given = tokenizer
        self.characters = []
        self.saw_end_of_text = False
        if tokenizer is None:
            self.table = np.full(0x110000, self.UNKNOWN, dtype=np.uint16)
        elif tokenizer.get_vocab_size() < self.END_OF_TEXT_ID:
            self.table = char_lookup_table(tokenizer, self.UNKNOWN, np.uint16)  # None for BPE
        else:
            self.table = None
        self.dtype = np.uint16 if tokenizer is None or tokenizer.get_vocab_size() < self.END_OF_TEXT_ID \
            else np.uint32

    def encode_many(self, texts) -> list:
        if self.table is None:  # BPE (or a huge vocabulary): the tokenizer, in parallel over chunks
            return [np.array(e.ids, dtype=self.dtype)
                    for e in self.given.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(text) for text in texts]

    def encode(self, text: str) -> np.ndarray:
        if self.table is None:
            return np.array(encode(self.given, text), dtype=self.dtype)
        if END_OF_TEXT in text:
            parts = []
            for i, piece in enumerate(text.split(END_OF_TEXT)):
                if i:
                    parts.append(np.array([self._end_of_text_id()], dtype=np.uint16))
                parts.append(self.encode(piece))
            return np.concatenate(parts)
        codepoints = (np.frombuffer(text.encode("ascii"), dtype=np.uint8) if text.isascii()
                      else np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32))
        ids = self.table[codepoints]
        if ids.size and ids.max() == self.UNKNOWN:
            if self.given is not None:  # characters this tokenizer only has as bytes
                return np.array(encode(self.given, text), dtype=np.uint16)
            new, first_seen = np.unique(codepoints[ids == self.UNKNOWN], return_index=True)
            for codepoint in new[np.argsort(first_seen)].tolist():  # ids in order of appearance
                self.table[codepoint] = len(self.characters)
                self.characters.append(chr(codepoint))
            if len(self.characters) + 256 >= self.END_OF_TEXT_ID:
                raise UserError("the text has more than 65,000 distinct characters: a character "
                                "tokenizer does not suit it")
            ids = self.table[codepoints]
        return ids

    def _end_of_text_id(self):
        self.saw_end_of_text = True
        return self.given.token_to_id(END_OF_TEXT) if self.given is not None else self.END_OF_TEXT_ID

    def tokenizer(self):
        return self.given if self.given is not None else build_char_tokenizer(self.characters)


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


def prepare_dataset(path: str, encoding: str = "utf-8", tokenizer=None) -> Dataset:
    """Tokenize the text at path (with the given tokenizer, or a new character tokenizer built
    from it), using the on-disk cache when it holds this text and tokenizer."""
    from tokenizers import Tokenizer
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
    _save_quietly(os.path.join(folder, f"{key}.json"), json.dumps({
        "version": CACHE_VERSION, "dtype": np.dtype(encoder.dtype).name, "n_tokens": n_tokens,
        "n_characters": n_characters}))
    if encoder.given is None:
        _save_quietly(char_tokenizer_file, tokenizer.to_str())
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


def bpe_tokenizer_for(path: str, encoding: str, vocab_size: int):
    """The BPE tokenizer trained on this text (cached next to it, keyed by content and size)."""
    from tokenizers import Tokenizer
    from custom_llm.tokenizer import train_bpe_tokenizer
    check_text_file(path)
    cached = os.path.join(cache_folder(path), f"{file_hash(path)}.{encoding}.bpe{vocab_size}.tokenizer.json")
    if os.path.exists(cached):
        return Tokenizer.from_file(cached), True
    if vocab_size < 258:
        raise UserError(f"vocab_size {vocab_size} is too small for a BPE tokenizer: it needs the 256 "
                        "bytes, <|endoftext|> and room for merges; run llm_model.py with --vocab_size 1000 or more", 2)
    tokenizer = train_bpe_tokenizer(read_chunks(path, encoding), vocab_size)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        _save_quietly(cached, tokenizer.to_str())
    except OSError:
        pass
    return tokenizer, False


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


def _save_quietly(path, content):
    """Cache files are an optimisation: failing to write one is not an error."""
    try:
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


def random_offsets(generator: np.random.Generator, n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """Starts of `count` windows at random: every overlapping chunk of the text can occur."""
    return generator.integers(0, n_tokens - block_size, size=count)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, block_size: int, device="cpu"):
    """(inputs, targets) for the windows starting at offsets, gathered in one go."""
    window = torch.from_numpy(tokens[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))
    if device != "cpu":
        window = window.pin_memory().to(device, non_blocking=True)
    return window[:, :-1], window[:, 1:]
