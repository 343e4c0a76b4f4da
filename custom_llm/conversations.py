"""Conversations to train a chat model on: JSONL files read and checked line by line, whole
conversations held out, and the rest packed into training windows (the chat's way to the batches,
beside the text's in corpus.py).

Each line is one conversation, in OpenAI's fine-tuning format (that of Hugging Face chat sets):
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
or the one-turn shorthand {"prompt": "...", "completion": "..."}. A bad line (not JSON, not in
the encoding, an unknown role, no assistant turn, an empty or non-text content) gets a note with
its file and line number and is skipped; messages after the last answer teach nothing and are
dropped.

The conversations are rendered and tokenized by chat.py (the template), and packed greedily into
windows of block_size + 1 tokens, a conversation never split between windows; one longer than a
window loses its oldest whole turns (or, when its last exchange alone is too long, the tokens
before the last window's worth), and these cuts are counted. Only the answers are targets.
"""

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from custom_llm.chat import ROLES, TURN_START, ChatFormat, conversation_runs, with_chat_tokens
from custom_llm.corpus import Corpus, spec_text
from custom_llm.data import PackedConversations
from custom_llm.errors import UserError, cannot_read
from custom_llm.textfile import END_OF_TEXT, codec
from custom_llm.tokenizer import build_char_tokenizer, train_bpe_tokenizer

CHAT_SUFFIX = ".jsonl"
HELD_OUT_EVERY = 10          # about one conversation in ten is held out for validation, by content hash
SHOWN_NOTES = 10             # bad lines named one by one; the rest are counted


def is_chat_corpus(corpus: Corpus) -> bool:
    """Conversations (JSONL) rather than text; a corpus of both is refused: they train in stages."""
    kinds = {d.path.lower().endswith(CHAT_SUFFIX) for d in corpus.documents}
    if len(kinds) > 1:
        n_chat = sum(d.path.lower().endswith(CHAT_SUFFIX) for d in corpus.documents)
        raise UserError(f"{spec_text(corpus.spec)} mixes {n_chat} conversation files (.jsonl) with "
                        f"{len(corpus.documents) - n_chat} text files: train on the text first, then on the "
                        "conversations with --init_from trained_model.pth", 2)
    return kinds == {True}


# ------------------------------------------------------------------ reading

def check_conversation(record):
    """(messages, None) for a usable line's JSON value, else (None, why not)."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if "messages" not in record and "prompt" in record and "completion" in record:
        record = {"messages": [{"role": "user", "content": record["prompt"]},
                               {"role": "assistant", "content": record["completion"]}]}
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, 'no "messages" list (or "prompt" and "completion")'
    checked = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return None, f"message {i} is not an object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return None, f"message {i} has role {json.dumps(role)[:40]}, not one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return None, f"message {i}'s content is not text"
        if not content.strip():
            return None, f"message {i}'s content is empty"
        checked.append({"role": role, "content": content})
    answers = [i for i, m in enumerate(checked) if m["role"] == "assistant"]
    if not answers:
        return None, "no assistant turn"
    return checked[:answers[-1] + 1], None


def read_conversations(corpus: Corpus):
    """(conversations, notes): every usable line of the corpus's files, and a note for each bad one."""
    codec(corpus.encoding)
    conversations, notes, n_bad = [], [], 0
    for document in corpus.documents:
        try:
            with open(document.path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError as err:
            raise cannot_read(document.path, err) from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = line.decode(corpus.encoding)
                messages, why = check_conversation(json.loads(text[1:] if text.startswith("\ufeff") else text))
            except UnicodeDecodeError:
                messages, why = None, f"not {corpus.encoding} text"
            except ValueError as err:
                messages, why = None, f"not JSON ({str(err).split(':')[0]})"
            if messages is None:
                n_bad += 1
                if n_bad <= SHOWN_NOTES:
                    notes.append(f"note: skipped {document.path}:{number}: {why}")
                continue
            conversations.append(messages)
    if n_bad > SHOWN_NOTES:
        notes.append(f"note: skipped {n_bad - SHOWN_NOTES} more bad lines (the first {SHOWN_NOTES} are named above)")
    if len(conversations) < 2:
        raise UserError(f"{spec_text(corpus.spec)} holds {len(conversations)} usable conversation"
                        f"{'' if len(conversations) == 1 else 's'} ({n_bad} bad line{'' if n_bad == 1 else 's'}): "
                        "training needs at least 2, one each to train and to validate on; one JSON object per "
                        'line, {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}', 2)
    return conversations, notes


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
        return (f"Conversations: {self.corpus.describe()}{train.n_conversations + val.n_conversations:,} -> "
                f"{train.n_conversations:,} training ({len(train.windows):,} windows) and {val.n_conversations:,} "
                f"held out ({len(val.windows):,} windows) of {train.windows.shape[1] - 1} tokens; "
                f"{100 * train.targets[:, 1:].mean():.0f}% of the training positions are answers"
                + (f"; {cut:,} conversation{'s' if cut > 1 else ''} longer than a window lost their "
                   "oldest turns" if cut else ""))


def prepare_conversations(corpus: Corpus, tokenizer, config: dict) -> ConversationSet:
    """The corpus's conversations, checked, held out, tokenized (with the given tokenizer, grown by
    the chat tokens, or a new one) and packed into windows of the config's block_size + 1."""
    conversations, notes = read_conversations(corpus)
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
                           corpus, n_characters, n_tokens, notes=corpus.notes() + notes)


def held_out_conversations(corpus: Corpus) -> list:
    """The held-out conversations (as training chose them), for the export's checks."""
    return split_held_out(read_conversations(corpus)[0])[1]
