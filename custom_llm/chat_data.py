"""Conversations as training data (data.py's chat kind): conversation files read and checked
record by record, whole conversations held out, and the rest packed into training windows; a chat model trains
on its answers only.

The files (.jsonl, .json, .parquet) and the layouts of a conversation in them (OpenAI's messages,
ShareGPT, Alpaca, prompt/completion) are read and checked by chat_layouts.py; a record that is not
a usable conversation gets a note with its file and line (or item, or row) and is skipped, and the
reasons are counted.

The conversations are rendered and tokenized by chat_format.py (the template), and packed greedily into
windows of sequence_length + 1 tokens (architectures.sequence_length: the block, or several windows
of it for a windowed model), a conversation never split between windows; one longer than a
window loses its oldest whole turns (or, when its last exchange alone is too long, the tokens
before the last window's worth), and these cuts are counted. Only the answers are targets.
"""

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from custom_llm.architectures import sequence_length
from custom_llm.chat_format import (DEFAULT_TEMPLATE, TEMPLATES, ChatFormat, conversation_runs, template_of_tokenizer,
                                    with_chat_tokens)
from custom_llm.chat_layouts import CONVERSATION_SUFFIXES, Reason, count_text, is_conversation_file, read_file
from custom_llm.corpus import Corpus, spec_text
from custom_llm.data import IGNORED, Dataset, HeldOut
from custom_llm.errors import UserError
from custom_llm.text_data import to_device
from custom_llm.textfile import END_OF_TEXT, codec
from custom_llm.tokenizer import build_char_tokenizer, train_bpe_tokenizer

HELD_OUT_EVERY = 10          # about one conversation in ten is held out for validation, by content hash
SHOWN_NOTES = 10             # bad lines named one by one; the rest are counted
SHOWN_REASONS = 3            # reasons whose first bad line the error names when too few conversations are usable


def claims(corpus: Corpus) -> bool:
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

def chat_tokenizer_for(runs: list, kind: str, vocab_size: int = None, template=DEFAULT_TEMPLATE):
    """A new tokenizer for rendered conversations (chat_format.conversation_runs), with the
    template's special tokens: one token per character of their text, or a BPE of vocab_size
    trained on it."""
    texts = [run.text for conversation in runs for run in conversation if not run.special]
    if kind == "bpe":
        return with_chat_tokens(train_bpe_tokenizer(iter(texts), vocab_size), template)
    return with_chat_tokens(build_char_tokenizer(dict.fromkeys("".join(texts))), template)


def cut_to_fit(ids, targets, window: int, turn_start_id: int):
    """(ids, targets) of a conversation that fits in window tokens: itself, else without its
    oldest whole turns, else its last window's worth; and whether it was cut."""
    if len(ids) <= window:
        return ids, targets, False
    turn_starts = np.flatnonzero(ids == turn_start_id)
    fitting = [s for s in turn_starts if len(ids) - s <= window and targets[s:].any()]
    start = int(fitting[0]) if fitting else len(ids) - window
    return ids[start:], targets[start:], True


@dataclass
class PackedWindows:
    """Conversations packed into windows of sequence_length + 1 tokens: the training or the validation
    part of a ChatDataset. Only the target positions (the answers) are trained on."""
    windows: np.ndarray         # (n, sequence_length + 1) token ids
    targets: np.ndarray         # (n, sequence_length + 1) bool: this token is an answer's, to be predicted
    n_conversations: int
    n_cut: int                  # conversations longer than a window, cut to fit

    def __len__(self) -> int:   # tokens, as for text: an epoch is every window once
        return self.windows.shape[0] * (self.windows.shape[1] - 1)


def pack(encoded: list, window: int, pad_id: int, turn_start_id: int) -> PackedWindows:
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
    return PackedWindows(windows, target_mask, len(encoded), n_cut)


@dataclass
class ChatDataset(Dataset):
    """What train_llm.py trains a chat model on."""
    train: PackedWindows = None
    val: PackedWindows = None
    template: object = DEFAULT_TEMPLATE     # chat_format.ChatTemplate
    n_token_count: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)   # records not read, by reason (chat_layouts.Reason.kind)
    sparse_targets = True

    @property
    def n_tokens(self) -> int:
        return self.n_token_count

    @property
    def n_train_tokens(self) -> int:
        return len(self.train)

    @property
    def val_source(self) -> str:
        return f"the {self.val.n_conversations} held-out conversations of {spec_text(self.corpus.spec)}"

    @property
    def saved_with_model(self) -> dict:
        return {"chat_template": self.template.name}

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
                   "oldest turns" if cut else "") + f" (prepared in {self.seconds:.1f}s)")

    def check_fits(self) -> None:
        """Each part holds at least one conversation (read_conversations), so one window."""

    def draw(self, split, generator, count):
        """Indices of packed windows."""
        return generator.integers(0, self._part(split).windows.shape[0], size=count)

    def batch(self, split, offsets, device="cpu"):
        part = self._part(split)
        window = torch.from_numpy(part.windows[offsets].astype(np.int64))
        targets = np.where(part.targets[offsets, 1:], part.windows[offsets, 1:], IGNORED)
        return to_device(window[:, :-1], torch.from_numpy(targets.astype(np.int64)), device)

    def _part(self, split: str) -> PackedWindows:
        return {"train": self.train, "val": self.val}[split]


# ------------------------------------------------------------------ the kind (data.py)

def prepare(corpus: Corpus, tokenizer, config: dict) -> ChatDataset:
    """The corpus's conversations, checked, held out, tokenized (with the given tokenizer, grown by
    the template's tokens, or a new one) and packed into windows of the config's sequence_length + 1.
    The template: the given tokenizer's, else the config's, else the default (ChatML)."""
    started = time.time()
    template = (tokenizer is not None and template_of_tokenizer(tokenizer)) or \
        TEMPLATES.get(config.get("chat_template"), DEFAULT_TEMPLATE)
    conversations, notes, skipped = read_conversations(corpus)
    training, held = split_held_out(conversations)
    runs_train, runs_val = (conversation_runs(part, template=template) for part in (training, held))  # rendered once
    made = []
    if tokenizer is None:
        tokenizer = chat_tokenizer_for(runs_train + runs_val, config.get("tokenizer", "char"),
                                       config.get("vocab_size_requested"), template)
    else:
        grown = with_chat_tokens(tokenizer, template)
        if grown is not tokenizer:
            made.append(f"The tokenizer gains the chat's tokens: {tokenizer.get_vocab_size()} -> "
                        f"{grown.get_vocab_size()} tokens (the model grows by as many rows)")
        tokenizer = grown
    chat = ChatFormat(tokenizer, template)
    window, pad_id, turn_start = sequence_length(config) + 1, tokenizer.token_to_id(END_OF_TEXT), \
        tokenizer.token_to_id(template.turn_start)
    encoded_train, encoded_val = chat.encode_runs(runs_train), chat.encode_runs(runs_val)
    n_characters = sum(len(m["content"]) for messages in conversations for m in messages)
    return ChatDataset(tokenizer, corpus, sequence_length(config), n_characters, False, notes=corpus.notes() + notes,
                       made=made, train=pack(encoded_train, window, pad_id, turn_start),
                       val=pack(encoded_val, window, pad_id, turn_start), template=template,
                       n_token_count=sum(len(ids) for ids, _ in encoded_train + encoded_val),
                       seconds=time.time() - started, skipped=skipped)


def held_out(corpus: Corpus, tokenizer, config: dict) -> HeldOut:
    """The held-out conversations (as training chose them), formatted one after the other, and
    themselves, to answer."""
    conversations = split_held_out(read_conversations(corpus)[0])[1]
    template = template_of_tokenizer(tokenizer) or DEFAULT_TEMPLATE
    tokens = [int(t) for ids, _ in ChatFormat(tokenizer, template).encode_many(conversations) for t in ids]
    return HeldOut(tokens, f"the {len(conversations)} held-out conversations of {spec_text(corpus.spec)}",
                   conversations)
