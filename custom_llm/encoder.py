"""Encoding: a text of any size, chunk by chunk, into token ids in one pass, written straight to
a token file (uint16; uint32 only for a vocabulary too large for it).

The character tokenizer's ids are looked up with numpy (one table lookup per chunk, no tokenizer
call); with no tokenizer given, the characters are numbered as they are first seen, so the same
pass discovers the vocabulary and encodes the text. A BPE tokenizer encodes groups of chunks in
parallel. Step 3 of the text's way (corpus.py lists them all): it reads what textfile.py decodes and
writes what tokens_cache.py keeps.
"""

import hashlib
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from custom_llm.errors import UserError
from custom_llm.textfile import CHUNK_BYTES, END_OF_TEXT
from custom_llm.tokenizer import BYTE_SYMBOLS, build_char_tokenizer, encode

GROUP_CHARACTERS = 16 * CHUNK_BYTES  # text encoded per batch: 16 full chunks, or many small documents


@dataclass
class EncodedText:
    tokenizer: Tokenizer    # the one given, or the character tokenizer built on the way
    dtype: type             # of the ids in the file
    n_tokens: int
    n_characters: int       # all characters encoded, <|endoftext|> separators included
    part_ends: list         # tokens written at the end of each part
    sha256: str             # of the file's bytes, as written


def encode_to_file(parts, tokenizer, out_path: str) -> EncodedText:
    """Encode the parts of a text (each a stream of chunks, corpus.Corpus.parts) one after the
    other into the token file out_path, with the given tokenizer or a new character tokenizer."""
    encoder = ChunkEncoder(tokenizer)
    n_tokens, n_characters, hasher = 0, 0, hashlib.sha256()
    part_ends = []
    with open(out_path, "wb") as out:
        for part in parts:
            for texts in _groups(part, 16, GROUP_CHARACTERS):
                for ids in encoder.encode_many(texts):
                    data = ids.tobytes()
                    out.write(data)
                    if not encoder.saw_placeholder:   # after one, hashed once they have their id
                        hasher.update(data)
                    n_tokens += len(ids)
                n_characters += sum(len(text) for text in texts)
            part_ends.append(n_tokens)
    tokenizer = encoder.tokenizer()
    if encoder.saw_placeholder and n_tokens:  # each <|endoftext|> placeholder gets its real id
        hasher = hashlib.sha256()
        tokens = np.memmap(out_path, dtype=np.uint16, mode="r+", shape=(n_tokens,))
        for start in range(0, n_tokens, 16 * CHUNK_BYTES):   # a block at a time: no text-sized mask
            block = tokens[start:start + 16 * CHUNK_BYTES]
            # By index, not by mask: ten times faster, as the placeholders are few.
            block[np.flatnonzero(block == ChunkEncoder.END_OF_TEXT_ID)] = tokenizer.token_to_id(END_OF_TEXT)
            hasher.update(block)
        tokens.flush()
        del tokens
    return EncodedText(tokenizer, encoder.dtype, n_tokens, n_characters, part_ends, hasher.hexdigest())


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


def char_lookup_table(tokenizer: Tokenizer, missing: int = -1, dtype=np.int32):
    """code point -> token id for every character that is a single token (`missing` elsewhere),
    so a text encodes with one numpy lookup instead of a tokenizer call. None when the tokenizer
    is not character level (a BPE token may span several characters)."""
    table = np.full(0x110000, missing, dtype=dtype)
    inverse = {symbol: index for index, symbol in enumerate(BYTE_SYMBOLS)}
    for token, index in tokenizer.get_vocab(with_added_tokens=False).items():
        try:
            text = bytes(inverse[s] for s in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue  # a partial character
        if len(text) > 1:
            return None
        table[ord(text)] = index
    return table


class ChunkEncoder:
    """Encodes text chunk by chunk into a compact id array with numpy lookups. Given no
    tokenizer, it builds the character tokenizer on the way: each new character gets the next id,
    so one pass over the text both discovers the vocabulary and encodes it."""

    UNKNOWN = np.iinfo(np.uint16).max          # a character without an id (yet)
    END_OF_TEXT_ID = UNKNOWN - 1               # placeholder until the final id is known
    # <|endoftext|> stands in the text as this one code point while it is looked up: a lone
    # surrogate, which no text the tokenizers accept holds (Rust strings cannot).
    END_OF_TEXT_MARK = "\udfff"
    RUN_CHARACTERS = 1 << 20                   # small texts (documents) are joined up to this: one lookup

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
        if self.table is not None:
            self.table[ord(self.END_OF_TEXT_MARK)] = \
                self.END_OF_TEXT_ID if tokenizer is None else tokenizer.token_to_id(END_OF_TEXT)
        self.dtype = np.uint16 if tokenizer is None or tokenizer.get_vocab_size() < self.END_OF_TEXT_ID \
            else np.uint32

    def encode_many(self, texts) -> list:
        """The ids of consecutive pieces of one text, as arrays to be written one after the other."""
        if self.table is None:  # BPE (or a huge vocabulary): the tokenizer, in parallel over chunks
            return [np.array(e.ids, dtype=self.dtype)
                    for e in self.given.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(run) for run in joined_runs(texts, self.RUN_CHARACTERS)]

    def encode(self, text: str) -> np.ndarray:
        """The ids of one text by table lookup (a character tokenizer's)."""
        if self.END_OF_TEXT_MARK in text:
            raise UserError("the text holds U+DFFF, half of a UTF-16 pair, which no tokenizer encodes: "
                            "read it with another --encoding")
        marked = text
        if END_OF_TEXT in text:
            self.saw_end_of_text = True
            marked = text.replace(END_OF_TEXT, self.END_OF_TEXT_MARK)
        codepoints = (np.frombuffer(marked.encode("ascii"), dtype=np.uint8) if marked.isascii()
                      else np.frombuffer(marked.encode("utf-32-le", "surrogatepass"), dtype=np.uint32))
        ids = self.table[codepoints]
        if ids.size and ids.max() == self.UNKNOWN:
            if self.given is not None:  # characters this tokenizer only has as bytes
                return np.array(encode(self.given, text), dtype=np.uint16)
            new, first_seen = np.unique(codepoints[ids == self.UNKNOWN], return_index=True)
            if len(self.characters) + len(new) + 256 >= self.END_OF_TEXT_ID:
                raise UserError(f"the text has more than {self.END_OF_TEXT_ID - 257:,} distinct characters, more "
                                "than a character tokenizer numbers in its 16-bit token file: use a BPE "
                                "tokenizer (python llm_model.py --tokenizer bpe)")
            for codepoint in new[np.argsort(first_seen)].tolist():  # ids in order of appearance
                self.table[codepoint] = len(self.characters)
                self.characters.append(chr(codepoint))
            ids = self.table[codepoints]
        return ids

    @property
    def saw_placeholder(self) -> bool:
        """Ids written so far hold placeholders for <|endoftext|> (a tokenizer is being built)."""
        return self.saw_end_of_text and self.given is None

    def tokenizer(self):
        return self.given if self.given is not None else build_char_tokenizer(self.characters)


def joined_runs(texts, limit: int):
    """The texts joined into runs of at most `limit` characters (a longer text is a run of its own)."""
    run, length = [], 0
    for text in texts:
        if run and length + len(text) > limit:
            yield "".join(run)
            run, length = [], 0
        run.append(text)
        length += len(text)
    if run:
        yield "".join(run)
