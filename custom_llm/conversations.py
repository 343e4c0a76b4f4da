"""Conversations to train a chat model on: JSONL files read and checked line by line, whole
conversations held out, and the rest packed into training windows (the chat's way to the batches,
beside the text's in corpus.py).

The files (.jsonl, .json, .parquet) and the layouts of a conversation in them (OpenAI's messages,
ShareGPT, Alpaca, prompt/completion) are read and checked by chat_layouts.py; a record that is not
a usable conversation gets a note with its file and line (or item, or row) and is skipped, and the
reasons are counted.

The conversations are rendered and tokenized by chat.py (the template), and packed greedily into
windows of block_size + 1 tokens, a conversation never split between windows; one longer than a
window loses its oldest whole turns (or, when its last exchange alone is too long, the tokens
before the last window's worth), and these cuts are counted. Only the answers are targets.
"""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from custom_llm.chat import TURN_START, ChatFormat, conversation_runs, with_chat_tokens
from custom_llm.chat_layouts import CONVERSATION_SUFFIXES, Reason, count_text, is_conversation_file, \
    read_file
from custom_llm.corpus import Corpus, spec_text
from custom_llm.data import PackedConversations
from custom_llm.errors import UserError
from custom_llm.textfile import END_OF_TEXT, codec
from custom_llm.tokenizer import build_char_tokenizer, train_bpe_tokenizer

HELD_OUT_EVERY = 10          # about one conversation in ten is held out for validation, by content hash
SHOWN_NOTES = 10             # bad lines named one by one; the rest are counted
SHOWN_REASONS = 3            # reasons whose first bad line the error names when too few conversations are usable


def is_chat_corpus(corpus: Corpus) -> bool:
    """Conversations rather than text; a corpus of both is refused: they train in stages."""
    text = [d.path for d in corpus.documents if not is_conversation_file(d.path)]
    if text and len(text) < len(corpus.documents):
        raise UserError(f"{spec_text(corpus.spec)} mixes {len(corpus.documents) - len(text)} conversation files "
                        f"({', '.join(CONVERSATION_SUFFIXES)}) with {len(text)} text files ({', '.join(text[:2])}"
                        f"{' ...' if len(text) > 2 else ''}): train on the text first, then on the "
                        "conversations with --init_from trained_model.pth", 2)
    return not text


# ------------------------------------------------------------------ reading

def read_conversations(corpus: Corpus):
    """(conversations, notes, skipped): every usable conversation of the corpus's files, a note for
    each of the first bad records, and how many were skipped for each reason (chat_layouts.py)."""
    codec(corpus.encoding)
    conversations, bad = [], []
    for document in corpus.documents:
        for where, result in read_file(document.path, corpus.encoding):
            if isinstance(result, Reason):
                bad.append((document.path + where, result))
            else:
                conversations.append(result)
    notes = [f"note: skipped {place}: {reason.detail}" for place, reason in bad[:SHOWN_NOTES]]
    if len(bad) > SHOWN_NOTES:
        notes.append(f"note: skipped {len(bad) - SHOWN_NOTES:,} more (the first {SHOWN_NOTES} are named above)")
    skipped = Counter(reason.kind for _, reason in bad)
    if len(conversations) < 2:
        first = {}   # the first bad record of each of the first SHOWN_REASONS reasons met
        for place, reason in bad:
            if len(first) < SHOWN_REASONS:
                first.setdefault(reason.kind, f"{place}: {reason.detail}")
        why = f", {len(bad):,} skipped: {count_text(skipped, first)}" if bad else ""
        raise UserError(f"{spec_text(corpus.spec)} holds {len(conversations)} usable conversation"
                        f"{'' if len(conversations) == 1 else 's'}{why}; training needs at least 2, one each to "
                        "train and to validate on: docs/chat.md shows the layouts read", 2)
    return conversations, notes, skipped


def split_held_out(conversations: list):
    """(training, held out): about one in HELD_OUT_EVERY, chosen by content hash (copies of one
    conversation go together, and the choice does not depend on the order of the lines); at least
    one of each."""
    keys = [hashlib.blake2b(json.dumps(m, sort_keys=True).encode(), digest_size=8).digest() for m in conversations]
    held = [int.from_bytes(k, "big") % HELD_OUT_EVERY == 0 for k in keys]
    if not any(held) or all(held):
        smallest = min(keys)
        held = [k == smallest for k in keys]
        if all(held):   # every conversation is the same one
            held[0] = False
    return ([m for m, h in zip(conversations, held) if not h], [m for m, h in zip(conversations, held) if h])


# ------------------------------------------------------------------ tokenizing and packing

def chat_tokenizer_for(runs: list, kind: str, vocab_size: int = None):
    """A new tokenizer for rendered conversations (chat.conversation_runs), with the chat's special
    tokens: one token per character of their text, or a BPE of vocab_size trained on it."""
    texts = [text for conversation in runs for text, special, _ in conversation if not special]
    if kind == "bpe":
        return with_chat_tokens(train_bpe_tokenizer(iter(texts), vocab_size))
    return with_chat_tokens(build_char_tokenizer(dict.fromkeys("".join(texts))))


def cut_to_fit(ids, targets, window: int, turn_start_id: int):
    """(ids, targets) of a conversation that fits in window tokens: itself, else without its
    oldest whole turns, else its last window's worth; and whether it was cut."""
    if len(ids) <= window:
        return ids, targets, False
    turn_starts = np.flatnonzero(ids == turn_start_id)
    fitting = [s for s in turn_starts if len(ids) - s <= window and targets[s:].any()]
    start = int(fitting[0]) if fitting else len(ids) - window
    return ids[start:], targets[start:], True


def pack(encoded: list, window: int, pad_id: int, turn_start_id: int) -> PackedConversations:
    """Encoded conversations packed in order into windows of `window` tokens, each conversation
    whole in one window; the rest of a window is padding, never a target."""
    rows, row_targets, n_cut = [], [], 0
    ids_row, targets_row = [], []
    for ids, targets in encoded:
        ids, targets, cut = cut_to_fit(ids, targets, window, turn_start_id)
        n_cut += cut
        if len(ids_row) + len(ids) > window:
            rows.append(ids_row)
            row_targets.append(targets_row)
            ids_row, targets_row = [], []
        ids_row += ids.tolist()
        targets_row += targets.tolist()
    if ids_row:
        rows.append(ids_row)
        row_targets.append(targets_row)
    windows = np.full((len(rows), window), pad_id, dtype=np.int32)   # int64 only for a batch
    target_mask = np.zeros((len(rows), window), dtype=bool)
    for i, (ids, targets) in enumerate(zip(rows, row_targets)):
        windows[i, :len(ids)] = ids
        target_mask[i, :len(targets)] = targets
    return PackedConversations(windows, target_mask, len(encoded), n_cut)


@dataclass
class ConversationSet:
    """What train_llm.py trains a chat model on: the Dataset of conversations."""
    tokenizer: object
    train: PackedConversations
    val: PackedConversations
    corpus: Corpus
    n_characters: int
    n_tokens: int
    notes: list = field(default_factory=list)
    from_cache: bool = False
    skipped: Counter = field(default_factory=Counter)   # records not read, by reason (chat_layouts.Reason.kind)

    @property
    def text_hash(self) -> str:
        return self.corpus.key

    @property
    def characters_per_token(self) -> float:
        return self.n_characters / max(1, self.n_tokens)

    @property
    def val_source(self) -> str:
        return f"the {self.val.n_conversations} held-out conversations of {spec_text(self.corpus.spec)}"

    def describe(self) -> str:
        train, val = self.train, self.val
        cut = train.n_cut + val.n_cut
        skipped = sum(self.skipped.values())
        return (f"Conversations: {self.corpus.describe()}{train.n_conversations + val.n_conversations:,}"
                + (f" ({skipped:,} skipped: {count_text(self.skipped)})" if skipped else "") + " -> "
                f"{train.n_conversations:,} training ({len(train.windows):,} windows) and {val.n_conversations:,} "
                f"held out ({len(val.windows):,} windows) of {train.windows.shape[1] - 1} tokens; "
                f"{100 * train.targets[:, 1:].mean():.0f}% of the training positions are answers"
                + (f"; {cut:,} conversation{'s' if cut > 1 else ''} longer than a window lost their "
                   "oldest turns" if cut else ""))


def prepare_conversations(corpus: Corpus, tokenizer, config: dict) -> ConversationSet:
    """The corpus's conversations, checked, held out, tokenized (with the given tokenizer, grown by
    the chat tokens, or a new one) and packed into windows of the config's block_size + 1."""
    conversations, notes, skipped = read_conversations(corpus)
    training, held_out = split_held_out(conversations)
    runs_train, runs_val = conversation_runs(training), conversation_runs(held_out)   # rendered once
    if tokenizer is None:
        tokenizer = chat_tokenizer_for(runs_train + runs_val, config.get("tokenizer", "char"),
                                       config.get("vocab_size_requested", config.get("vocab_size")))
    else:
        tokenizer = with_chat_tokens(tokenizer)
    chat = ChatFormat(tokenizer)
    window, pad_id, turn_start = config["block_size"] + 1, tokenizer.token_to_id(END_OF_TEXT), \
        tokenizer.token_to_id(TURN_START)
    encoded_train, encoded_val = chat.encode_runs(runs_train), chat.encode_runs(runs_val)
    n_characters = sum(len(m["content"]) for messages in conversations for m in messages)
    n_tokens = sum(len(ids) for ids, _ in encoded_train + encoded_val)
    return ConversationSet(tokenizer, pack(encoded_train, window, pad_id, turn_start),
                           pack(encoded_val, window, pad_id, turn_start),
                           corpus, n_characters, n_tokens, notes=corpus.notes() + notes, skipped=skipped)


def held_out_conversations(corpus: Corpus) -> list:
    """The held-out conversations (as training chose them), for the export's checks."""
    return split_held_out(read_conversations(corpus)[0])[1]
