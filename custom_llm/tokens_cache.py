"""What is made from a corpus, kept for the next run: its token file, and the BPE tokenizer
trained on it (cache.py keeps the cache folder honest and small).

Step 4 of the text's way (corpus.py lists them all). The token file of a text is named by the
corpus's key (its content) and the tokenizer's hash, so a changed text or another tokenizer never
reuses stale tokens, and it is checked against its own content hash when it is read, so a damaged
file is rebuilt, never trained on. A character tokenizer built while encoding is cached beside the
tokens, so a second run finds both without reading the text.
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from custom_llm.atomic import atomic_path, remove_stale_temporaries
from custom_llm.cache import digest, load_checked, save_checked, token_cache_folder, touch, trim
from custom_llm.corpus import Corpus, spec_text
from custom_llm.encoder import encode_to_file
from custom_llm.errors import UserError
from custom_llm.tokenizer import tokenizer_hash, train_bpe_tokenizer

CACHE_VERSION = 3


@dataclass
class TokenFile:
    tokenizer: Tokenizer
    tokens: np.ndarray      # memory-mapped: the training documents' tokens, then the held-out ones'
    n_characters: int       # of the documents' text (no separators)
    n_held_out: int         # tokens of the held-out documents, last in tokens; None: none held out
    from_cache: bool
    notes: list = field(default_factory=list)   # lines for the user: where the cache is, what was rebuilt


def bpe_tokenizer_for(corpus: Corpus, vocab_size: int):
    """(the BPE tokenizer trained on all of the corpus's documents, whether it came from the cache);
    cached, keyed by their content, the encoding and the size."""
    folder, _ = token_cache_folder(corpus.folder)
    cached = os.path.join(folder, f"{corpus.key}.{corpus.encoding}.bpe{vocab_size}.tokenizer.json")
    tokenizer = _tokenizer_from_cache(cached)
    if tokenizer is not None:
        return tokenizer, True
    tokenizer = train_bpe_tokenizer(corpus.texts(), vocab_size)
    save_checked(cached, tokenizer.to_str())
    return tokenizer, False


def token_file_for(corpus: Corpus, tokenizer=None) -> TokenFile:
    """The corpus's tokens with the given tokenizer, or a new character tokenizer built from its
    text: from the cache when it holds this text and tokenizer, else encoded (encoder.py) and kept."""
    text_key = corpus.key
    folder, where = token_cache_folder(corpus.folder)
    notes = [where] if where else []
    char_tokenizer_file = os.path.join(folder, f"{text_key}.{corpus.encoding}.tokenizer.json")
    known = tokenizer if tokenizer is not None else _tokenizer_from_cache(char_tokenizer_file)
    if known is not None:
        cached = _cached_tokens(folder, f"{text_key}-{tokenizer_hash(known)}", notes)
        if cached is not None:
            tokens, meta = cached
            return TokenFile(known, tokens, meta["n_characters"], meta.get("n_held_out"), True, notes)

    # Written whole under a provisional name, then renamed once the tokenizer (part of the key) is known.
    provisional = os.path.join(folder, f"{text_key}.partial.tokens")
    remove_stale_temporaries(provisional)
    with atomic_path(provisional) as tmp:
        encoded = encode_to_file(corpus.parts(), tokenizer, tmp)
        if encoded.n_tokens == 0:
            raise UserError(f"{spec_text(corpus.spec)} is empty: training needs some text")
    n_tokens, part_ends = encoded.n_tokens, encoded.part_ends
    n_characters = encoded.n_characters - corpus.separator_characters  # <|endoftext|> is no text of theirs
    n_held_out = n_tokens - part_ends[0] if len(part_ends) == 2 else None
    key = f"{text_key}-{tokenizer_hash(encoded.tokenizer)}"
    tokens_file = os.path.join(folder, f"{key}.tokens")
    os.replace(provisional, tokens_file)
    save_checked(os.path.join(folder, f"{key}.json"), json.dumps({
        "version": CACHE_VERSION, "dtype": np.dtype(encoded.dtype).name, "n_tokens": n_tokens,
        "n_characters": n_characters, "n_held_out": n_held_out, "sha256": encoded.sha256}))
    if tokenizer is None:
        save_checked(char_tokenizer_file, encoded.tokenizer.to_str())
    trim(folder, keep=text_key)
    tokens = np.memmap(tokens_file, dtype=encoded.dtype, mode="r", shape=(n_tokens,))
    return TokenFile(encoded.tokenizer, tokens, n_characters, n_held_out, False, notes)


def _tokenizer_from_cache(path: str):
    """A cached tokenizer, or None when there is none or it does not match its saved hash."""
    content = load_checked(path)
    if content is None:
        return None
    try:
        return Tokenizer.from_str(content)
    except Exception:
        return None


def _cached_tokens(folder, key, notes):
    """(memory-mapped tokens, their saved facts) from the cache, or None. A token file whose
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
