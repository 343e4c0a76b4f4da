"""The tokenizer, all of it: how it is built, trained, saved, loaded, hashed, and used to encode
a text of any size in one pass.

Two kinds, both in the shape llama.cpp's `gpt2` tokenizer runs id for id (byte-level BPE):
  * the character tokenizer (the default): one token per character seen in training.
    - all 256 byte symbols are in the vocabulary, so text never seen in training (emoji, CJK,
      control bytes) still encodes, as byte tokens, and decodes back to the same text;
    - multi-byte characters are built from their bytes by merges that can only fire inside a
      character (a UTF-8 lead byte followed by its continuation bytes), so no merge ever crosses
      a character boundary;
  * a byte-level BPE trained on your text (llm_model.py --tokenizer bpe).
One special token, <|endoftext|>, ends text; no ordinary character does. The same vocabulary and
merges drive Hugging Face `tokenizers` (training, HF export) and the GGUF (llama.cpp), so both
tokenize identically.
"""

import hashlib
import json
import os
import sys

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from custom_llm.atomic import atomic_path
from custom_llm.errors import UserError, cannot_read
from custom_llm.cache import load_checked, save_checked, token_cache_folder
from custom_llm.corpus import find_documents
from custom_llm.textfile import END_OF_TEXT

# Strings on which Python and llama.cpp must agree id for id; convert_to_gguf.py checks them.
HARD_STRINGS = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "\n\n\n",
    "line one\r\nline two\r\n",
    "\ttabs\tand\t\tmore\t",
    "Hello, World! 123 4567 3.14159",
    "don't won't it's I'm you're",
    "naïve café résumé Zürich",
    "e\u0301 a\u0308 combining marks\u0336",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир",
    "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈",
    "🇫🇷🇯🇵🇺🇸",
    "\x00\x01\x02\x1b[31m bell\x07",
    "<|endoftext|>",
    "text <|endoftext|> more <|endoftext",
    "<s></s>[INST]<unk>",
    "a" * 300,
    " " * 50 + "x",
    "\u200b\u200d\ufeff zero width",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
]


def bytes_to_symbols() -> list:
    """GPT-2's map from each byte to a printable character (the byte-level alphabet):
    printable Latin-1 bytes stand for themselves, the others are moved to U+0100 onwards."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


BYTE_SYMBOLS = bytes_to_symbols()


def _symbol(data: bytes) -> str:
    return "".join(BYTE_SYMBOLS[b] for b in data)


def build_char_tokenizer(characters) -> Tokenizer:
    """A tokenizer with one token per given character, plus byte fallback and <|endoftext|>.

    Ids: the characters first, in the order given (so a text can be encoded in one pass while
    its characters are still being discovered), then the remaining byte tokens, then the partial
    characters that merges pass through, then <|endoftext|> (always the last id)."""
    characters = list(dict.fromkeys(c for c in characters if c))
    vocab, merges = {}, []

    def add(symbol):
        if symbol not in vocab:
            vocab[symbol] = len(vocab)

    for ch in characters:
        add(_symbol(ch.encode("utf-8")))
    for symbol in BYTE_SYMBOLS:
        add(symbol)
    known = set()
    for ch in characters:
        data = ch.encode("utf-8")
        for end in range(2, len(data) + 1):
            pair = (_symbol(data[:end - 1]), _symbol(data[end - 1:end]))
            if pair not in known:
                known.add(pair)
                merges.append(pair)
            add(pair[0] + pair[1])
    # llama.cpp requires at least one merge and an all-ASCII text has none: add one that can
    # never fire, joining two bytes that never occur in UTF-8 (0xF8, 0xF9).
    unused = (BYTE_SYMBOLS[0xF8], BYTE_SYMBOLS[0xF9])
    merges.append(unused)
    add(unused[0] + unused[1])

    return build_bpe_tokenizer(vocab, merges)


def build_bpe_tokenizer(vocab: dict, merges: list) -> Tokenizer:
    """The project's tokenizer shape around a byte-level BPE's vocab (symbol -> id) and merges
    (pairs, by rank): GPT-2's pre-tokenizer and decoder, <|endoftext|> its one special token
    (at its id in vocab when it is there, else the next one)."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def train_bpe_tokenizer(texts, vocab_size: int, length: int = None) -> Tokenizer:
    """A byte-level BPE trained on the given texts (an iterator of strings) up to vocab_size
    tokens, with <|endoftext|> as its one special token: GPT-2's tokenizer, trained on your text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python train_llm.py` first, it writes the tokenizer")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            content = f.read()
    except OSError as err:
        raise cannot_read(path, err) from None
    try:
        return Tokenizer.from_str(content)
    except Exception as err:
        raise UserError(f"{path} is not a readable tokenizer ({str(err).splitlines()[0][:120]}): "
                        "retrain with `python train_llm.py`") from None


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
    with atomic_path(path) as tmp:
        tokenizer.save(tmp)


def vocab_and_merges(tokenizer: Tokenizer):
    """(tokens in id order, merges as 'left right' strings, id of <|endoftext|>)."""
    model = json.loads(tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, merges, vocab[END_OF_TEXT]


def encode(tokenizer: Tokenizer, text: str) -> list:
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


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


def tokenizer_hash(tokenizer) -> str:
    return hashlib.blake2b(tokenizer.to_str().encode(), digest_size=8).hexdigest()


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
        if self.table is None:
            return np.array(encode(self.given, text), dtype=self.dtype)
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


def bpe_tokenizer_for(spec, encoding: str, vocab_size: int):
    """The BPE tokenizer trained on the text or documents spec names (corpus.py), all of them;
    cached, keyed by their content and the size."""
    corpus = find_documents(spec, encoding)
    folder, _ = token_cache_folder(corpus.folder)
    cached = os.path.join(folder, f"{corpus.key}.{encoding}.bpe{vocab_size}.tokenizer.json")
    tokenizer = tokenizer_from_cache(cached)
    if tokenizer is not None:
        return tokenizer, True
    if vocab_size < 258:
        raise UserError(f"vocab_size {vocab_size} is too small for a BPE tokenizer: it needs the 256 "
                        "bytes, <|endoftext|> and room for merges; run llm_model.py with --vocab_size 1000 or more", 2)
    tokenizer = train_bpe_tokenizer(corpus.texts(), vocab_size)
    save_checked(cached, tokenizer.to_str())
    return tokenizer, False


def tokenizer_from_cache(path: str):
    """A cached tokenizer, or None when there is none or it does not match its saved hash."""
    content = load_checked(path)
    if content is None:
        return None
    try:
        return Tokenizer.from_str(content)
    except Exception:
        return None
