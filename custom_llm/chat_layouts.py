"""Conversations as people have them: the kinds of file that hold them and the layouts of one
conversation, each turned into the messages chat_format.py renders, or into the reason it cannot be.

Two tables, so that another layout or kind of file is one more entry:

  FILE_KINDS  by suffix: a reader, path -> (where, record or Reason) for each record in the file,
              where being what follows the path in a note (":12" for line 12, " item 3", " row 7");
  LAYOUTS     by keys: the first layout whose keys a record has turns it into messages.

Every layout's messages then meet the same check (conversation): roles are system, user and
assistant in any case (ShareGPT's human and gpt too), a content is text or a list of text parts,
none is empty, there is an answer, and no content holds a marker of the chat format (a front end
would read it as the special token: docs/chat.md says why such a conversation is skipped).
Messages after the last answer teach nothing and are dropped.

A record that fails gets a Reason: its kind is counted, its detail is the note for its line.
"""

import codecs
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from custom_llm.chat_format import MARKERS, ROLES
from custom_llm.errors import UserError, cannot_read


@dataclass(frozen=True)
class Reason:
    """Why a record is not a usable conversation."""
    kind: str       # what is counted: "not JSON", "with an unknown role" ("3 with an unknown role")
    detail: str     # the note for this record: 'message 2 has role "bot", not one of ...'


# ------------------------------------------------------------------ layouts of one conversation

def from_messages(record):
    """OpenAI's and Hugging Face's chat layout: {"messages": [{"role": ..., "content": ...}, ...]}."""
    return record["messages"]


def from_sharegpt(record):
    """ShareGPT: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}."""
    return record["conversations"]


def from_alpaca(record):
    """Alpaca: {"instruction": ..., "input": ... (optional, may be empty), "output": ...}, one turn;
    the input follows the instruction after a blank line."""
    question, extra = record["instruction"], record.get("input")
    if extra is not None and not isinstance(extra, str):
        return Reason("with a content that is not text", '"input" is not text')
    if isinstance(question, str) and extra and extra.strip():
        question = f"{question}\n\n{extra}"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]


def from_prompt_completion(record):
    """{"prompt": ..., "completion": ...}: one turn; or, with lists of messages (Hugging Face's
    conversational prompt-completion), the prompt's messages then the completion's."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        return prompt + completion
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


@dataclass(frozen=True)
class Layout:
    name: str
    keys: tuple             # a record with all of these keys is in this layout
    messages: Callable      # record -> its messages (checked afterwards by conversation), or a Reason


LAYOUTS = [
    Layout("messages", ("messages",), from_messages),
    Layout("ShareGPT", ("conversations",), from_sharegpt),
    Layout("Alpaca", ("instruction", "output"), from_alpaca),
    Layout("prompt/completion", ("prompt", "completion"), from_prompt_completion),
]   # the first whose keys a record has (with a value: a Parquet column of nulls is no key) is its layout

ROLE_NAMES = {**{role: role for role in ROLES}, "human": "user", "gpt": "assistant"}   # lower case
# A marker of the chat format, or a byte not in the encoding (kept as a surrogate: _decode) or an unpaired surrogate.
_MARKER_OR_NOT_TEXT = re.compile("|".join(re.escape(token) for token in MARKERS) + "|[\ud800-\udfff]")


def expected_layouts() -> str:
    """'"messages", "conversations", "instruction" and "output", or "prompt" and "completion"'."""
    names = [" and ".join(f'"{key}"' for key in layout.keys) for layout in LAYOUTS]
    return ", ".join(names[:-1]) + ", or " + names[-1]


def conversation(record, encoding: str = "utf-8"):
    """The checked messages of one record (a list of {"role", "content"} ending with an answer),
    or the Reason it is not usable."""
    if not isinstance(record, dict):
        return Reason("not an object", "not a JSON object")
    for layout in LAYOUTS:
        if None not in map(record.get, layout.keys):
            break
    else:
        keys = [key for key, value in record.items() if value is not None]
        found = ", ".join(json.dumps(key, ensure_ascii=False)[:40] for key in keys[:6]) + " ..." * (len(keys) > 6)
        return Reason("in no known layout", f"no known layout: its keys are {found or 'none'}; expected "
                      f"{expected_layouts()}")
    messages = layout.messages(record)
    if type(messages) is Reason:
        return messages
    if type(messages) is not list or not messages:
        return Reason("with no messages", f'its "{layout.keys[0]}" is '
                      + ("an empty list" if messages == [] else "not a list of messages"))
    checked = []
    for i, message in enumerate(messages, 1):
        checked_message = _message(i, message)
        if type(checked_message) is Reason:
            return checked_message
        checked.append(checked_message)
    last = len(checked)
    while last and checked[last - 1]["role"] != "assistant":
        last -= 1
    if not last:
        return Reason("with no assistant turn", "no assistant turn")
    checked = checked[:last]   # messages after the last answer teach nothing
    if _MARKER_OR_NOT_TEXT.search("\n".join(m["content"] for m in checked)):   # rare: then say where
        for i, message in enumerate(checked, 1):
            found = _MARKER_OR_NOT_TEXT.search(message["content"])
            if found and found.group() in MARKERS:
                return Reason("holding a chat marker", f"message {i} holds {found.group()}, a marker of the chat "
                              "format, which front ends read as a special token")
            if found:
                return Reason(f"not {encoding} text", f"message {i}'s content is not {encoding} text")
    return checked


def _message(i: int, message):
    """One message as {"role", "content"}: the role's name (or ShareGPT's "from") in any case, the
    content (or "value") as text, its text parts joined; else the Reason."""
    if type(message) is not dict:
        return Reason("with a message that is not an object", f"message {i} is not an object")
    named = message.get("role")
    if named is None:
        named = message.get("from")
    role = (ROLE_NAMES.get(named) or ROLE_NAMES.get(named.lower())) if type(named) is str else None
    if role is None:
        shown = json.dumps(named, ensure_ascii=False)[:40]
        return Reason("with an unknown role", f"message {i} has role {shown}, not one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None:
        content = message.get("value")
    if type(content) is list:   # OpenAI's parts: [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            return Reason("with a content that is not text", f"message {i}'s content has a part that is not text")
        content = "".join(p["text"] for p in content)   # joined as chat templates join them
    if type(content) is not str:
        return Reason("with a content that is not text", f"message {i}'s content is not text")
    if not content.strip():
        return Reason("with an empty content", f"message {i}'s content is empty")
    return {"role": role, "content": content}


# ------------------------------------------------------------------ kinds of file

def _decode(data: bytes, encoding: str) -> str:
    """Text with each byte not in the encoding kept as a lone surrogate (conversation skips a
    message holding one); a byte-order mark at the start dropped."""
    text = codecs.decode(data, encoding, "surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise cannot_read(path, err) from None


def read_json_lines(path: str, encoding: str):
    """A .jsonl file: one record a line, blank lines left out."""
    yield from _lines(_read(path).split(b"\n"), encoding)


def _lines(lines, encoding: str):
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f":{number}", json.loads(_decode(line, encoding))
        except UnicodeDecodeError:
            yield f":{number}", Reason(f"not {encoding} text", f"not {encoding} text")
        except ValueError as err:
            yield f":{number}", Reason("not JSON", f"not JSON ({str(err).split(':')[0]})")


def read_json(path: str, encoding: str):
    """A .json file: an array of records, numbered as items from 1. One record a line (JSON Lines,
    as some tools write under this name) is read as a .jsonl file. Anything else is not
    conversations: a one-line error."""
    data = _read(path)
    try:
        text = _decode(data, encoding)
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not valid {encoding}: bad byte at byte offset {err.start}; convert it to "
                        "UTF-8 or pass --encoding") from None
    what_to_do = ('give conversations as a JSON array, [{"messages": [...]}, ...], or one a line in a .jsonl '
                  "file (docs/chat.md); to train on it as plain text, rename it to .txt")
    try:
        value = json.loads(text)
    except ValueError as err:
        if getattr(err, "msg", "") == "Extra data" and text.lstrip().startswith("{"):   # an object, then more
            yield from _lines(data.split(b"\n"), encoding)   # JSON Lines
            return
        where = f" (line {err.lineno}, column {err.colno}: {err.msg})" if hasattr(err, "lineno") else ""
        raise UserError(f"{path} is not valid JSON{where}: {what_to_do}", 2) from None
    if not isinstance(value, list) or (value and not isinstance(value[0], dict)):
        if isinstance(value, list):
            held = f"an array whose first item is {_json_kind(value[0])}"
        elif isinstance(value, dict) and value:
            held = "an object with the keys " + ", ".join(list(value)[:5])
        else:
            held = _json_kind(value)
        raise UserError(f"{path} holds {held}, not an array of conversations: {what_to_do}", 2)
    for number, record in enumerate(value, 1):
        yield f" item {number}", record


def _json_kind(value) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def read_parquet(path: str, encoding: str):
    """A .parquet file (how the Hugging Face hub serves data sets): one record a row, read a batch
    of rows at a time with pyarrow."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install -r requirements.txt") from None
    number = 0
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                number += 1
                yield f" row {number}", record
    except (OSError, pyarrow.ArrowException, ValueError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise cannot_read(path, err) from None
        said = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path} cannot be read as Parquet ({said}): check that it is a whole .parquet file") from None


@dataclass(frozen=True)
class FileKind:
    suffix: str
    read: Callable          # (path, encoding) -> iterator of (where, record or Reason)


FILE_KINDS = [
    FileKind(".jsonl", read_json_lines),
    FileKind(".json", read_json),
    FileKind(".parquet", read_parquet),
]
CONVERSATION_SUFFIXES = tuple(kind.suffix for kind in FILE_KINDS)


def is_conversation_file(path: str) -> bool:
    return path.lower().endswith(CONVERSATION_SUFFIXES)


def read_file(path: str, encoding: str = "utf-8"):
    """(where, checked messages or Reason) for each record of a conversation file."""
    kind = next(kind for kind in FILE_KINDS if path.lower().endswith(kind.suffix))
    for where, record in kind.read(path, encoding):
        yield where, record if isinstance(record, Reason) else conversation(record, encoding)


def count_text(kinds: Counter, first: dict = None) -> str:
    """'28 with an unknown role, 2 not JSON': the reasons' kinds, most frequent first, each followed
    by the first record of that kind where first has one: '2 not JSON (first a.jsonl:4: not JSON ...)'."""
    first = first or {}
    return ", ".join(f"{n:,} {kind}" + (f" (first {first[kind]})" if kind in first else "")
                     for kind, n in kinds.most_common())
