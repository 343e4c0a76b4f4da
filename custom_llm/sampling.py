"""Generation settings, the sampler, stop strings and the streamed generation itself: what
inference_gguf.py, PyTorch's generate() and the benchmark share. The one sampler (Sampler)
serves both the llama.cpp path and PyTorch's generate(); a new sampling control is a Settings
field, a step in Sampler, and a Knob in commands.py (its range: flags.py)."""

import codecs
import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# ------------------------------------------------------------------------------ settings


@dataclass
class Settings:
    temperature: float = 0.8        # 0: greedy (argmax)
    top_k: Optional[int] = None     # keep the k likeliest tokens
    top_p: Optional[float] = None   # keep the smallest set whose probability reaches top_p
    min_p: Optional[float] = None   # keep tokens at least min_p times as likely as the likeliest
    repeat_penalty: float = 1.0     # 1: off; above 1 makes recently seen tokens less likely
    repeat_last_n: int = 64         # how many recent tokens (prompt included) the penalty sees
    max_tokens: int = 100
    seed: Optional[int] = None      # same seed and settings: same text, every generation
    stop: list = field(default_factory=list)  # text ends before the first of these

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ sampling

class Sampler:
    """Picks the next token from logits: repeat penalty, then temperature, top-k, top-p,
    min-p, in that order. With a seed, every generation starts from that seed again."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.start([])

    def start(self, prompt_tokens) -> None:
        s = self.settings
        self.rng = np.random.default_rng(s.seed)
        self.recent = collections.deque(prompt_tokens[-s.repeat_last_n:], maxlen=s.repeat_last_n)

    def __call__(self, logits: np.ndarray) -> int:
        s = self.settings
        if s.repeat_penalty != 1.0 and self.recent:
            logits = penalize(logits, self.recent, s.repeat_penalty)
        if s.temperature == 0:
            token = int(np.argmax(logits))   # greedy: exactly the argmax, nothing else
        else:
            probs = filtered_probabilities(logits, s.temperature, s.top_k, s.top_p, s.min_p)
            # Inverse CDF with one uniform draw per token: reproducible and cheap.
            cumulative = np.cumsum(probs)
            token = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
            token = min(token, len(probs) - 1)
        self.recent.append(token)
        return token


def penalize(logits: np.ndarray, recent, penalty: float) -> np.ndarray:
    """The repeat penalty as in CTRL and llama.cpp: a seen token's positive logit is divided by
    the penalty, a negative one multiplied, so its odds always drop (for penalty > 1)."""
    seen = np.fromiter(set(recent), dtype=np.int64)
    out = np.array(logits, dtype=np.float32)
    values = out[seen]
    out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out


def filtered_probabilities(logits, temperature, top_k=None, top_p=None, min_p=None) -> np.ndarray:
    """Probabilities after temperature and the top-k, top-p and min-p filters (not renormalized:
    the caller draws against their sum)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    if top_k and top_k < len(scaled):
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        cut = int(np.searchsorted(cumulative, top_p * cumulative[-1])) + 1  # smallest set reaching top_p
        keep = np.zeros_like(probs)
        keep[order[:cut]] = probs[order[:cut]]
        probs = keep
    if min_p:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
    return probs


# ------------------------------------------------------------------------- stop strings

class StopStrings:
    """Streamed text passes through; it ends before the first stop string, which is never shown.
    The tail that might still grow into a stop string is held back until it cannot."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        # The stop string completed first wins (of those ending together, the one starting first),
        # as if the text had arrived one character at a time: the result must not depend on how
        # the text was split into tokens.
        found = [(i + len(s), i, s) for s in self.stops for i in [self.pending.find(s)] if i >= 0]
        if found:
            _, cut, self.hit = min(found)
            ready, self.pending = self.pending[:cut], ""
            return ready
        # Hold the longest tail that is the start of some stop string.
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        ready, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return ready

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return ready


# ---------------------------------------------------------------------------- generation

@dataclass
class Generation:
    prompt: str
    text: str = ""
    tokens: list = field(default_factory=list)
    n_prompt_tokens: int = 0
    stop_reason: str = "max_tokens"     # max_tokens, end_of_text, end_of_turn, stop_string, interrupted
    time_to_first_token_s: Optional[float] = None
    tokens_per_s: Optional[float] = None   # after the first token (the decode speed)
    total_s: float = 0.0

    def as_dict(self, settings: Settings) -> dict:
        return {"prompt": self.prompt, "text": self.text, "tokens": self.tokens,
                "n_prompt_tokens": self.n_prompt_tokens, "n_tokens": len(self.tokens),
                "timings": {"time_to_first_token_s": self.time_to_first_token_s,
                            "tokens_per_s": self.tokens_per_s, "total_s": self.total_s},
                "settings": settings.as_dict(), "stop_reason": self.stop_reason}


def stream(model, prompt: str, settings: Settings, sampler: Sampler, on_text=None,
           prompt_tokens=None) -> Generation:
    """Generate from prompt with model (a GGUFModel), calling on_text(piece) as text becomes
    final; prompt_tokens, when given, are what the model reads instead of the prompt's tokens (a
    conversation's, for a chat model). Ctrl-C ends the generation (stop_reason 'interrupted')
    instead of the program."""
    result = Generation(prompt)
    if prompt_tokens is None:
        prompt_tokens = model.tokenize(prompt)
    result.n_prompt_tokens = len(prompt_tokens)
    sampler.start(prompt_tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may split a character
    stops = StopStrings(settings.stop)
    pieces = []

    def emit(text):
        if text:
            pieces.append(text)
            if on_text:
                on_text(text)

    started = time.perf_counter()
    first = last = None
    n_yielded = 0
    try:
        for token in model.generate(prompt_tokens, settings.max_tokens, sampler):
            last = time.perf_counter()
            first = first or last
            n_yielded += 1
            if token in model.stop_tokens:
                result.stop_reason = "end_of_turn" if token == model.end_of_turn else "end_of_text"
                break
            result.tokens.append(token)
            emit(stops.feed(decoder.decode(model.token_bytes(token))))
            if stops.hit is not None:
                result.stop_reason = "stop_string"
                break
    except KeyboardInterrupt:
        result.stop_reason = "interrupted"
    if stops.hit is None:
        emit(stops.feed(decoder.decode(b"", final=True)))
        emit(stops.flush())
    result.total_s = time.perf_counter() - started
    result.text = "".join(pieces)
    if first is not None:
        result.time_to_first_token_s = first - started
        if n_yielded > 1:
            result.tokens_per_s = (n_yielded - 1) / (last - first)
    return result
