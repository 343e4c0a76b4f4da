"""Running a GGUF of ours through llama.cpp (llama-cpp-python): safe loading, tokenization,
logits, and generation: a GPT-2 GGUF's follows the project's context rule (context.py); a windowed
one's (gguf_keys.WINDOWED_ARCHITECTURES) reads on with llama.cpp's own window, never re-reading.
No torch here."""

import collections
import contextlib
import ctypes
import os
import sys
import threading
import weakref

from dataclasses import dataclass

import numpy as np

from custom_llm import gguf_keys
from custom_llm.chat_format import encode_prompt_with, render_pieces, template_of_gguf
from custom_llm.context import fit_prompt, slide
from custom_llm.errors import UserError, cannot_read
from custom_llm.resources import llama_threads

GGUF_MAGIC = b"GGUF"
_load_lock = threading.Lock()
N_BATCH = 512              # tokens of a prompt decoded at once


@dataclass(frozen=True)
class GGUFFacts:
    """What check_gguf learns from a GGUF of ours."""
    trained_context: int    # the block size trained on; None for files written before it was recorded
    windowed: bool          # every layer attends to a window of trained_context (windowed.py)
    context_length: int     # the file's <arch>.context_length


class LlamaLog:
    """llama.cpp's log, kept in memory instead of printed: shown only when something fails
    (or with LLAMA_LOG=1), so loading a model does not scroll pages of details past the user."""

    def __init__(self):
        self.lines = collections.deque(maxlen=5000)
        self.count = 0
        self._callback = None

    def install(self):
        if self._callback is not None:
            return
        import llama_cpp
        import llama_cpp._logger  # noqa: F401  (it installs its own callback on import; ours replaces it)
        echo = os.environ.get("LLAMA_LOG") == "1"

        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):
            line = text.decode("utf-8", "replace")
            self.lines.append(line)
            self.count += 1
            if echo:
                sys.stderr.write(line)

        self._callback = collect  # ctypes must not free the callback while llama.cpp holds it
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))

    def mark(self) -> int:
        self.install()
        return self.count

    def since(self, mark: int) -> list:
        new = self.count - mark
        return list(self.lines)[-new:] if new > 0 else []


llama_log = LlamaLog()


def check_gguf(path: str):
    """A one-line error unless path is a GGUF that this project wrote (an architecture of
    gguf_keys.READABLE_ARCHITECTURES, a gpt2 tokenizer). Returns its GGUFFacts: the block size it
    was trained on (None for files written before that was recorded, whose context_length was the
    block size) and whether it is windowed."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python convert_to_gguf.py` first, or pass --gguf_path", 2)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: pass the path of a .gguf file", 2)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise cannot_read(path, err) from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')", 2)
    import gguf
    try:
        reader = gguf.GGUFReader(path)
        fields = {name: _field_value(field) for name, field in reader.fields.items()
                  if name in (gguf_keys.ARCHITECTURE, gguf_keys.TOKENIZER_MODEL)}
        trained_context = _number(reader, gguf_keys.TRAINED_CONTEXT)
        context_length = _number(reader, f"{fields.get(gguf_keys.ARCHITECTURE)}.context_length")
    except Exception as err:
        raise UserError(f"{path} is a damaged or truncated GGUF ({type(err).__name__}): "
                        "convert the model again with `python convert_to_gguf.py`") from None
    architecture = fields.get(gguf_keys.ARCHITECTURE)
    if architecture not in gguf_keys.READABLE_ARCHITECTURES or fields.get(gguf_keys.TOKENIZER_MODEL) != "gpt2":
        raise UserError(f"{path} is a GGUF of another kind (architecture {architecture!r}); this tool runs "
                        f"the GGUFs it writes ({', '.join(gguf_keys.READABLE_ARCHITECTURES)})")
    windowed = architecture in gguf_keys.WINDOWED_ARCHITECTURES
    if windowed and not trained_context:
        raise UserError(f"{path} does not say the window it was trained with: convert the model again with "
                        "`python convert_to_gguf.py`")
    return GGUFFacts(trained_context, windowed, context_length or 0)


def _number(reader, key: str):
    field = reader.fields.get(key)
    return int(field.parts[field.data[0]][0]) if field else None


def _field_value(field):
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


@contextlib.contextmanager
def no_weight_repacking():
    """llama.cpp's extra buffer types repack quantized weights for AMX (some Intel CPUs), and
    that path crashes on our models (a segfault in the first decode). llama-cpp-python's Llama
    does not expose the `use_extra_bufts` model parameter, so default it to off while loading."""
    from llama_cpp import llama_cpp  # the module Llama reads its defaults from
    original = llama_cpp.llama_model_default_params

    def params_without_extra_bufts():
        params = original()
        params.use_extra_bufts = False
        return params

    with _load_lock:
        llama_cpp.llama_model_default_params = params_without_extra_bufts
        try:
            yield
        finally:
            llama_cpp.llama_model_default_params = original


def gpu_offload_supported() -> bool:
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


def open_llama(path: str, n_ctx=None, n_threads=None, **params):
    """(llama_cpp.Llama for the GGUF at path, its GGUFFacts): the one way this project loads a GGUF
    into llama.cpp. The file is checked first, llama.cpp's AMX repacking is kept off, its log is
    kept quiet and a failure is one line. n_ctx: the context (default the trained block; llama.cpp
    rounds it up to a multiple of 256); n_threads: for decoding and prompts alike (default
    resources.llama_threads: chosen for the model and the free cores); params: Llama's others."""
    facts = check_gguf(path)
    return load_checked(path, facts, n_ctx, n_threads, **params), facts


def load_checked(path: str, facts: GGUFFacts, n_ctx=None, n_threads=None, **params):
    """open_llama's Llama, for a file check_gguf has already read (its facts)."""
    threads = n_threads or llama_threads(path)
    from llama_cpp import Llama
    mark = llama_log.mark()
    with no_weight_repacking():
        try:
            llm = Llama(model_path=path, n_ctx=(facts.trained_context or 0) if n_ctx is None else n_ctx,
                        verbose=False, n_threads=threads, n_threads_batch=threads, **params)
        except Exception:
            said = [line.strip() for line in llama_log.since(mark) if line.strip()]
            raise UserError(f"llama.cpp could not load {path}: {said[-1] if said else 'no reason given'}; "
                            "convert the model again with `python convert_to_gguf.py`") from None
    return llm


def windowed_context(block_size: int, context_length: int) -> int:
    """The context GGUFModel opens for a windowed GGUF: the file's context_length (what front
    ends that size their cache from the file hold; it bounds a conversation, inference_gguf.py),
    and at least a window plus a batch of prompt tokens, in llama.cpp's multiples of 256."""
    return -(-max(context_length, block_size + N_BATCH) // 256) * 256


class GGUFModel:
    """A GGUF loaded in llama.cpp, with the same tokenizer and the same reading past the block as
    the PyTorch model: a GPT-2 GGUF slides (context.py), a windowed one reads on."""

    def __init__(self, path: str, use_gpu: bool = False, logits_all: bool = False, n_threads=None, n_ctx=None):
        self.path = path
        self.on_gpu = use_gpu
        facts = check_gguf(path)
        self.windowed = facts.windowed
        # GPT-2: a context of the trained block, not the file's whole position table: generate()
        # slides at the block anyway. Windowed: windowed_context, or n_ctx (the checks' long pass).
        if self.windowed:
            n_ctx = windowed_context(facts.trained_context, facts.context_length) if n_ctx is None else \
                max(n_ctx, facts.trained_context)
        self.llm = load_checked(path, facts, n_ctx=n_ctx, n_threads=n_threads, n_batch=N_BATCH,
                                logits_all=logits_all, n_gpu_layers=-1 if use_gpu else 0)
        self.threads = self.llm.n_threads   # the rule and its reasons: resources.py
        self.block_size = facts.trained_context or self.llm._model.n_ctx_train()
        if self.llm.n_ctx() < self.block_size:
            raise UserError(f"{path}: llama.cpp gave a context of {self.llm.n_ctx()} < {self.block_size}")
        # The tokens one generation reads and writes at most: the block for GPT-2 (it slides
        # there); a windowed model reads any length, and a conversation is kept up to its context.
        self.context = self.llm.n_ctx() if self.windowed else self.block_size
        # generate() talks to llama.cpp directly through one reusable batch: Llama.eval would
        # rebuild the batch in Python and bookkeep tokens for every new token.
        import llama_cpp
        self._c = llama_cpp
        self._ctx = self.llm._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        capacity = max(self.block_size, N_BATCH) if self.windowed else self.block_size
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        for i in range(capacity):
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self.end_of_text = self.llm.token_eos()
        self.n_vocab = self.llm.n_vocab()
        self.pieces = self._read_pieces()
        # A chat model (trained on conversations) carries its template and its end-of-turn token.
        try:
            self.chat_template = template_of_gguf(self.llm.metadata.get(gguf_keys.CHAT_TEMPLATE))
        except ValueError:
            raise UserError(f"{path} has a chat template this tool does not know: convert the model again "
                            "with `python convert_to_gguf.py`") from None
        end_of_turn = self.llm.metadata.get(gguf_keys.END_OF_TURN) if self.chat_template else None
        self.end_of_turn = int(end_of_turn) if end_of_turn is not None else None
        self.stop_tokens = {self.end_of_text} | ({self.end_of_turn} if self.end_of_turn is not None else set())
        self._special_ids = {}

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None

    # Text <-> tokens. special=True: the literal "<|endoftext|>" is the end-of-text token,
    # as in the Python tokenizer.
    def tokenize(self, text: str) -> list:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def tokenize_literal(self, text: str) -> list:
        """Text as text: a typed "<|im_end|>" or "<|endoftext|>" is characters, never the token."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def special_id(self, name: str) -> int:
        """The id of a special token, by its text, from the file's vocabulary."""
        if name not in self._special_ids:
            ids = self.llm.tokenize(name.encode("utf-8"), add_bos=False, special=True)
            if len(ids) != 1:
                raise UserError(f"{self.path} has no token {name}: convert the model again with "
                                "`python convert_to_gguf.py`")
            self._special_ids[name] = ids[0]
        return self._special_ids[name]

    def encode_chat(self, messages) -> list:
        """The prompt ids of a conversation, ending where the assistant's answer starts: the
        template's special tokens by id, each message's content tokenized as text (chat_format.py)."""
        return encode_prompt_with(render_pieces(messages, add_generation_prompt=True, template=self.chat_template),
                                  self.tokenize_literal, self.special_id)

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token]

    def detokenize(self, tokens) -> str:
        return b"".join(self.pieces[t] for t in tokens).decode("utf-8", "replace")

    def _read_pieces(self) -> list:
        """Every token's bytes, read once. (llama-cpp-python's own detokenize uses a 32-byte
        buffer and silently cuts longer pieces, which BPE vocabularies have.)"""
        import llama_cpp
        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        pieces, size = [], 64
        buffer = ctypes.create_string_buffer(size)
        for token in range(self.n_vocab):
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
            if n < 0:  # too small: llama.cpp says how much it needs
                size = -n
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
            pieces.append(buffer.raw[:n])
        return pieces

    # Logits.
    def logits(self, tokens) -> np.ndarray:
        """(len(tokens), vocab) logits of tokens read in one pass from position 0: at most
        block_size of them (GPT-2), or of the context opened (windowed); needs logits_all."""
        limit = self.llm.n_ctx() if self.windowed else self.block_size
        if len(tokens) > limit:
            raise ValueError(f"{len(tokens)} tokens exceed the context of {limit}")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[:len(tokens)], dtype=np.float32)

    def _decode(self, tokens, first_position: int) -> np.ndarray:
        """Evaluate tokens at positions first_position..; return the last one's logits as a
        view into llama.cpp's buffer (valid until the next decode)."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = first_position + i
            batch.logits[i] = False
        batch.logits[len(tokens) - 1] = True
        status = self._c.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        return np.ctypeslib.as_array(self._c.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def _decode_window(self, window) -> np.ndarray:
        self._c.llama_memory_clear(self._memory, True)  # positions restart at 0
        return self._decode(window, 0)

    def generate(self, prompt_tokens, max_new_tokens: int, pick_next):
        """Yield new tokens one by one. pick_next(logits) -> token, where logits is a read-only
        view. Stops at <|endoftext|>, and on a chat model at the end of a turn (<|im_end|>);
        the stop token is yielded. An empty prompt starts from <|endoftext|>, as GPT-2 does.
        A GPT-2 GGUF follows the context rule (context.py): no position ever reaches block_size,
        which would abort the whole process inside llama.cpp. A windowed one reads on
        (_generate_windowed)."""
        if self.windowed:
            yield from self._generate_windowed(prompt_tokens or [self.end_of_text], max_new_tokens, pick_next)
            return
        window = fit_prompt(prompt_tokens or [self.end_of_text], self.block_size)
        logits = self._decode_window(window)
        batch, decode, get_logits = self._batch, self._c.llama_decode, self._c.llama_get_logits_ith
        for produced in range(max_new_tokens):
            token = int(pick_next(logits))
            yield token
            if token in self.stop_tokens or produced == max_new_tokens - 1:
                return
            if len(window) < self.block_size:
                # Room left: one more position (the per-token path: a few ctypes stores and one
                # llama_decode call; no Python loop, no copy of the logits).
                window.append(token)
                batch.n_tokens = 1
                batch.token[0] = token
                batch.pos[0] = len(window) - 1
                batch.logits[0] = True
                status = decode(self._ctx, batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode returned {status}")
                logits = np.ctypeslib.as_array(get_logits(self._ctx, -1), shape=(self.n_vocab,))
            else:
                window = slide(window + [token], self.block_size)  # full: re-read the kept half
                logits = self._decode_window(window)

    def _generate_windowed(self, prompt, max_new_tokens: int, pick_next):
        """A windowed GGUF's generate(): the prompt read once, N_BATCH tokens at a time, then one
        decode per new token; positions keep counting up, and llama.cpp's window (every layer
        sees the last block_size positions) does what the PyTorch model does. Positions the
        window no longer needs are removed from the cache before it fills (exact: no token
        attends to them again), so any length runs in the context opened (a smaller context reads
        the prompt in smaller batches: a window and a batch must fit)."""
        self._c.llama_memory_clear(self._memory, True)
        self._kept_from = 0            # the first position still in the cache
        step = max(1, min(N_BATCH, self.context - self.block_size + 1))
        for start in range(0, len(prompt), step):
            logits = self._decode_windowed(prompt[start:start + step], start)
        position = len(prompt)
        for produced in range(max_new_tokens):
            token = int(pick_next(logits))
            yield token
            if token in self.stop_tokens or produced == max_new_tokens - 1:
                return
            logits = self._decode_windowed([token], position)
            position += 1

    def _decode_windowed(self, tokens, first_position: int) -> np.ndarray:
        """_decode, after removing the positions no new token can see once the cache would
        overflow, or once PRUNE_EVERY of them have gathered (so the cache's cells in use, which
        llama.cpp attends over, stay few)."""
        unseen = first_position - self.block_size + 1      # positions before this are out of every window
        if unseen - self._kept_from >= PRUNE_EVERY or first_position + len(tokens) - self._kept_from > self.context:
            self._c.llama_memory_seq_rm(self._memory, 0, 0, unseen)
            self._kept_from = unseen
        return self._decode(tokens, first_position)


# A windowed generation frees the positions out of the window in batches of this many.
PRUNE_EVERY = 64

