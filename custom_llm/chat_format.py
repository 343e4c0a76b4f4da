"""The chat format, every fact of it in one place: the templates (the single source of how a
conversation becomes tokens), their special tokens, the ids that end an answer, and whether a
tokenizer or a GGUF belongs to a chat model.

A chat model's tokenizer holds two more special tokens, its template's turn start and end of turn,
and its config names its template (config["chat_template"], as TEMPLATES names it). The one
template today is ChatML, written as Jinja: the layout every llama.cpp front end knows
(llama-cpp-python recognises this exact template, llama.cpp's C++ front ends recognise
<|im_start|> even without Jinja, Ollama maps it to its ChatML template). The same template string
goes into the HF export (chat_template) and the GGUF (tokenizer.chat_template), and it is rendered
here, with Jinja, for training and for generation:

  * render_pieces renders the template with each message's content replaced by a placeholder, so
    what the template wrote (the frame) and what the user wrote (the contents) stay apart;
  * the frame's special tokens become their ids; the text between them, frame and contents
    together, is tokenized as llama.cpp tokenizes a rendered prompt (split at special tokens, each
    stretch of text on its own), except that a content's text never becomes a special token;
  * the assistant's contents, and the end-of-turn token that closes each, are the training
    targets; the rest is context.

A second layout is one more ChatTemplate in TEMPLATES.
"""

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np
from tokenizers import Tokenizer

from custom_llm.textfile import END_OF_TEXT

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    name: str               # saved in the model's config (config["chat_template"])
    jinja: str              # what the HF export and the GGUF carry, and what is rendered here
    turn_start: str         # its special tokens, added to a chat model's tokenizer
    end_of_turn: str        # ends an answer

    @property
    def chat_tokens(self) -> list:
        return [self.turn_start, self.end_of_turn]

    @property
    def special_tokens(self) -> list:
        return [END_OF_TEXT] + self.chat_tokens


# ChatML. Not character for character llama-cpp-python's own ChatML template on purpose: on that
# string it formats with a built-in formatter that adds an empty system turn when there is none,
# unlike every other front end; on any other template it renders the template itself, as here.
CHATML = ChatTemplate(
    "chatml",
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    "<|im_start|>", "<|im_end|>")
TEMPLATES = {template.name: template for template in [CHATML]}
DEFAULT_TEMPLATE = CHATML

# The default template's, by name (the tests and the benchmark write them).
CHAT_TEMPLATE, TURN_START, END_OF_TURN = CHATML.jinja, CHATML.turn_start, CHATML.end_of_turn
SPECIAL_TOKENS = CHATML.special_tokens
# Every template's special tokens: typed in a conversation, front ends would read them as markers.
MARKERS = sorted({token for template in TEMPLATES.values() for token in template.special_tokens})


def template_of_tokenizer(tokenizer) -> Optional[ChatTemplate]:
    """The template whose special tokens the tokenizer holds: a chat model's; None for a model
    that continues text."""
    for template in TEMPLATES.values():
        if all(tokenizer.token_to_id(t) is not None for t in template.chat_tokens):
            return template
    return None


def is_chat_tokenizer(tokenizer) -> bool:
    return template_of_tokenizer(tokenizer) is not None


def template_of_config(config: dict, tokenizer) -> Optional[ChatTemplate]:
    """A trained model's template: the one its config names (models trained before the name was
    saved: the one its tokenizer's tokens belong to); None for a model that continues text."""
    name = config.get("chat_template")
    return TEMPLATES[name] if name in TEMPLATES else template_of_tokenizer(tokenizer)


def template_of_gguf(jinja: Optional[str]) -> Optional[ChatTemplate]:
    """A GGUF's template, from its tokenizer.chat_template; None when it has none. A template this
    project does not know raises ValueError (the file was written by something else)."""
    if jinja is None:
        return None
    for template in TEMPLATES.values():
        if template.jinja == jinja:
            return template
    raise ValueError("unknown chat template")


def end_ids(tokenizer, template: Optional[ChatTemplate]) -> set:
    """The ids that end an answer: the end of text, and a chat model's end of turn."""
    ids = {tokenizer.token_to_id(END_OF_TEXT)}
    if template is not None:
        ids.add(tokenizer.token_to_id(template.end_of_turn))
    return ids


def with_chat_tokens(tokenizer: Tokenizer, template: ChatTemplate = DEFAULT_TEMPLATE) -> Tokenizer:
    """The tokenizer with the template's special tokens (a copy, after its last id), or itself
    when it has them. Earlier ids keep their meaning, so trained weights grow by rows (model.py)."""
    if all(tokenizer.token_to_id(t) is not None for t in template.chat_tokens):
        return tokenizer
    grown = Tokenizer.from_str(tokenizer.to_str())
    grown.add_special_tokens(template.chat_tokens)
    return grown


@lru_cache(maxsize=None)
def _compiled(template: ChatTemplate):
    from jinja2.sandbox import ImmutableSandboxedEnvironment   # as transformers renders templates
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    specials = re.compile("(" + "|".join(re.escape(t) for t in template.special_tokens) + ")")
    return environment.from_string(template.jinja), specials


def render(messages, add_generation_prompt: bool = False, template: ChatTemplate = DEFAULT_TEMPLATE) -> str:
    """The conversation as the template writes it: the text every front end feeds the model."""
    return _compiled(template)[0].render(messages=messages, add_generation_prompt=add_generation_prompt)


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")   # private-use characters: no content holds them


@dataclass
class Piece:
    text: str               # a special token's name, or text
    special: bool
    target: bool            # trained on: an assistant's content, and the end of its turn


def render_pieces(messages, add_generation_prompt: bool = False, template: ChatTemplate = DEFAULT_TEMPLATE) -> list:
    """The rendered conversation as pieces: the template's special tokens, and text. The text
    pieces of the template and of the contents alternate, so no content is read for a special
    token; the assistant's contents and the special token after each (its end of turn) are targets."""
    stand_ins = [dict(message, content=f"\ue000{i}\ue001") for i, message in enumerate(messages)]
    rendered = render(stand_ins, add_generation_prompt, template)
    specials = _compiled(template)[1]
    pieces, after_answer = [], False
    for i, part in enumerate(_PLACEHOLDER.split(rendered)):
        if i % 2:   # a content
            message = messages[int(part)]
            answer = message["role"] == "assistant"
            pieces.append(Piece(message["content"], False, answer))
            after_answer = answer
            continue
        for j, frame in enumerate(specials.split(part)):
            if j % 2:
                pieces.append(Piece(frame, True, after_answer))
                after_answer = False
            elif frame:
                pieces.append(Piece(frame, False, False))
    return pieces


class TextRun(NamedTuple):
    """A special token (targets: whether it is trained on), or the text between two of them
    (targets: one flag per character)."""
    text: str
    special: bool
    targets: object


def text_runs(pieces) -> list:
    """The pieces as TextRuns, the text between two special tokens joined, as llama.cpp tokenizes
    a rendered prompt."""
    runs = []
    for piece in pieces:
        if piece.special:
            runs.append(TextRun(piece.text, True, piece.target))
        elif runs and not runs[-1].special:
            runs[-1] = TextRun(runs[-1].text + piece.text, False, runs[-1].targets + [piece.target] * len(piece.text))
        else:
            runs.append(TextRun(piece.text, False, [piece.target] * len(piece.text)))
    return runs


def conversation_runs(conversations, add_generation_prompt: bool = False,
                      template: ChatTemplate = DEFAULT_TEMPLATE) -> list:
    """Each conversation rendered, as its text_runs."""
    return [text_runs(render_pieces(m, add_generation_prompt, template)) for m in conversations]


class ChatFormat:
    """Conversations to token ids (and training targets) with a chat tokenizer."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate = DEFAULT_TEMPLATE):
        self.tokenizer, self.template = tokenizer, template
        self.literal = Tokenizer.from_str(tokenizer.to_str())
        self.literal.encode_special_tokens = True   # "<|im_end|>" typed in a message is text
        self.special_ids = {t: tokenizer.token_to_id(t) for t in template.special_tokens}
        self.end_of_turn = self.special_ids[template.end_of_turn]

    def encode(self, messages, add_generation_prompt: bool = False):
        """(ids, target flags) of one conversation."""
        return self.encode_many([messages], add_generation_prompt)[0]

    def encode_many(self, conversations, add_generation_prompt: bool = False) -> list:
        """[(ids as an int array, targets as a bool array)], one per conversation; their text is
        tokenized in one batch."""
        return self.encode_runs(conversation_runs(conversations, add_generation_prompt, self.template))

    def encode_runs(self, all_runs) -> list:
        """encode_many for conversations already rendered (conversation_runs)."""
        texts = [run.text for runs in all_runs for run in runs if not run.special]
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
class ChatHistory:
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
            messages = ChatHistory(self.system, self.turns[dropped:]).messages(message)
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
