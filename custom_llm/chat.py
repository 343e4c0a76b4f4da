"""The chat format: one template, the single source of how a conversation becomes tokens.

A chat model's tokenizer holds two more special tokens, <|im_start|> and <|im_end|> (the end of
a turn), and its layout is ChatML, written as the Jinja template CHAT_TEMPLATE. ChatML is the
layout every llama.cpp front end knows: llama-cpp-python recognises this exact template,
llama.cpp's C++ front ends recognise <|im_start|> even without Jinja, Ollama maps it to its
ChatML template. The same template string goes into the HF export (chat_template) and the GGUF
(tokenizer.chat_template), and it is rendered here, with Jinja, for training and for generation:

  * render_pieces renders the template with each message's content replaced by a placeholder, so
    what the template wrote (the frame) and what the user wrote (the contents) stay apart;
  * the frame's special tokens become their ids; the text between them, frame and contents
    together, is tokenized as llama.cpp tokenizes a rendered prompt (split at special tokens, each
    stretch of text on its own), except that a content's text never becomes a special token,
    even if someone types "<|im_end|>";
  * the assistant's contents, and the end-of-turn token that closes each, are the training
    targets; the rest is context.
"""

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from custom_llm.textfile import END_OF_TEXT

TURN_START = "<|im_start|>"
END_OF_TURN = "<|im_end|>"
CHAT_TOKENS = [TURN_START, END_OF_TURN]
SPECIAL_TOKENS = [END_OF_TEXT] + CHAT_TOKENS
ROLES = ("system", "user", "assistant")

# ChatML. Not character for character llama-cpp-python's own ChatML template on purpose: on that
# string it formats with a built-in formatter that adds an empty system turn when there is none,
# unlike every other front end; on any other template it renders the template itself, as here.
CHAT_TEMPLATE = ("{%- for message in messages -%}"
                 "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
                 "{%- endfor -%}"
                 "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")   # private-use characters: no content holds them
_SPECIAL = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def is_chat_tokenizer(tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in CHAT_TOKENS)


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the chat's special tokens (a copy, after its last id), or itself when it
    has them. Earlier ids keep their meaning, so trained weights grow by rows (model.py)."""
    if is_chat_tokenizer(tokenizer):
        return tokenizer
    grown = Tokenizer.from_str(tokenizer.to_str())
    grown.add_special_tokens(CHAT_TOKENS)
    return grown


@lru_cache(maxsize=1)
def _template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment   # as transformers renders templates
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(CHAT_TEMPLATE)


def render(messages, add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it: the text every front end feeds the model."""
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt)


@dataclass
class Piece:
    text: str               # a special token's name, or text
    special: bool
    target: bool            # trained on: an assistant's content, and the end of its turn


def render_pieces(messages, add_generation_prompt: bool = False) -> list:
    """The rendered conversation as pieces: the template's special tokens, and text. The text
    pieces of the template and of the contents alternate, so no content is read for a special
    token; the assistant's contents and the special token after each (its end of turn) are targets."""
    stand_ins = [dict(message, content=f"\ue000{i}\ue001") for i, message in enumerate(messages)]
    rendered = render(stand_ins, add_generation_prompt)
    pieces, after_answer = [], False
    for i, part in enumerate(_PLACEHOLDER.split(rendered)):
        if i % 2:   # a content
            message = messages[int(part)]
            answer = message["role"] == "assistant"
            pieces.append(Piece(message["content"], False, answer))
            after_answer = answer
            continue
        for j, frame in enumerate(_SPECIAL.split(part)):
            if j % 2:
                pieces.append(Piece(frame, True, after_answer))
                after_answer = False
            elif frame:
                pieces.append(Piece(frame, False, False))
    return pieces


def text_runs(pieces) -> list:
    """The pieces as runs: (special token, target) or (text, per-character target flags), the
    text between two special tokens joined, as llama.cpp tokenizes a rendered prompt."""
    runs = []
    for piece in pieces:
        if piece.special:
            runs.append((piece.text, True, piece.target))
        elif runs and not runs[-1][1]:
            text, _, flags = runs[-1]
            runs[-1] = (text + piece.text, False, flags + [piece.target] * len(piece.text))
        else:
            runs.append((piece.text, False, [piece.target] * len(piece.text)))
    return runs


def conversation_runs(conversations, add_generation_prompt: bool = False) -> list:
    """Each conversation rendered, as its text_runs."""
    return [text_runs(render_pieces(m, add_generation_prompt)) for m in conversations]


class ChatFormat:
    """Conversations to token ids (and training targets) with a chat tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.literal = Tokenizer.from_str(tokenizer.to_str())
        self.literal.encode_special_tokens = True   # "<|im_end|>" typed in a message is text
        self.special_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.end_of_turn = self.special_ids[END_OF_TURN]

    def encode(self, messages, add_generation_prompt: bool = False):
        """(ids, target flags) of one conversation."""
        return self.encode_many([messages], add_generation_prompt)[0]

    def encode_many(self, conversations, add_generation_prompt: bool = False) -> list:
        """[(ids as an int array, targets as a bool array)], one per conversation; their text is
        tokenized in one batch."""
        return self.encode_runs(conversation_runs(conversations, add_generation_prompt))

    def encode_runs(self, all_runs) -> list:
        """encode_many for conversations already rendered (conversation_runs)."""
        texts = [run[0] for runs in all_runs for run in runs if not run[1]]
        encodings = iter(self.literal.encode_batch(texts, add_special_tokens=False))
        encoded = []
        for runs in all_runs:
            ids, targets = [], []
            for text, special, flags in runs:
                if special:
                    ids.append(self.special_ids[text])
                    targets.append(flags)
                    continue
                encoding = next(encodings)
                ids += encoding.ids
                # A token is a target when its first character is (a token never spans a frame
                # and a content here but for a whitespace run where the two meet).
                targets += [flags[start] if start < len(flags) else False for start, _ in encoding.offsets]
            encoded.append((np.array(ids, dtype=np.int64), np.array(targets, dtype=bool)))
        return encoded


def encode_prompt_with(pieces, tokenize, special_id) -> list:
    """The ids of rendered pieces with another tokenizer (llama.cpp's): tokenize(text) for each
    run of text (never producing special tokens), special_id(name) for the template's."""
    ids = []
    for text, special, _ in text_runs(pieces):
        ids += [special_id(text)] if special else tokenize(text)
    return ids


class TurnTooLong(Exception):
    """The newest message alone (with the system message) leaves no room for its answer."""

    def __init__(self, n_tokens: int):
        super().__init__(n_tokens)
        self.n_tokens = n_tokens


@dataclass
class Conversation:
    """A conversation held at the prompt: an optional system message and whole turns (a user's
    message and its answer). Before each answer it is fitted to the context: its oldest whole
    turns go, never half a turn, and the system message stays."""
    system: Optional[str] = None
    turns: list = field(default_factory=list)   # [(message, answer)], oldest first

    def messages(self, message: Optional[str] = None) -> list:
        """The conversation as messages, with message as the newest user turn when given."""
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        for asked, answered in self.turns:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        if message is not None:
            messages.append({"role": "user", "content": message})
        return messages

    def fit(self, message: str, encode, limit: int):
        """(messages, ids, n_dropped): the conversation asking message, as encode(messages) gives
        its prompt ids, in at most limit ids; the n_dropped oldest turns that did not fit are
        dropped for good. Raises TurnTooLong (and drops nothing) when the system message and
        message alone are over limit."""
        for dropped in range(len(self.turns) + 1):
            messages = Conversation(self.system, self.turns[dropped:]).messages(message)
            ids = encode(messages)
            if len(ids) <= limit:
                del self.turns[:dropped]
                return messages, ids, dropped
        raise TurnTooLong(len(ids))

    def add(self, message: str, answer: str) -> None:
        self.turns.append((message, answer))

    def reset(self) -> None:
        """Start over; the system message stays."""
        self.turns.clear()
