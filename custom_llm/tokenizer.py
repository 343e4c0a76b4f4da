"""The tokenizer: its vocabulary, how it is built or trained, saved, loaded and hashed, and
encoding and decoding a string (encoder.py encodes a text of any size; tokens_cache.py keeps what
is made from a corpus).

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

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from custom_llm.atomic import atomic_path
from custom_llm.errors import UserError, cannot_read
from custom_llm.textfile import END_OF_TEXT

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


# A BPE holds the 256 byte tokens, <|endoftext|> and at least one merge.
MIN_BPE_VOCABULARY = 258


def train_bpe_tokenizer(texts, vocab_size: int, length: int = None) -> Tokenizer:
    """A byte-level BPE trained on the given texts (an iterator of strings) up to vocab_size
    tokens, with <|endoftext|> as its one special token: GPT-2's tokenizer, trained on your text."""
    if vocab_size < MIN_BPE_VOCABULARY:
        raise UserError(f"vocab_size {vocab_size} is too small for a BPE tokenizer: it needs the 256 "
                        "bytes, <|endoftext|> and room for merges; run llm_model.py with --vocab_size 1000 or more", 2)
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


def tokenizer_hash(tokenizer) -> str:
    return hashlib.blake2b(tokenizer.to_str().encode(), digest_size=8).hexdigest()
