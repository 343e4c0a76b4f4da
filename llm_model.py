"""Stage 1: choose the shape of your GPT and save it to model_config.pth.

    python llm_model.py                 # answer the questions
    python llm_model.py --n_layer 4 -y  # flags for some, defaults for the rest

The model itself lives here too. Its graph is exactly GPT-2's (learned positions, pre-LayerNorm
blocks with biases, fused QKV, GELU with the tanh approximation, an output head without bias), so
the Hugging Face and GGUF exports are exact copies of it rather than approximations.
"""

import contextlib
import math
import os
import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F

from custom_llm.cli import (ArgumentParser, Question, UserError, add_question_flags, ask,
                            atomic_path, fraction, positive_int, run)

CONFIG_KEYS = ("vocab_size", "n_embd", "n_head", "n_layer", "block_size", "dropout")
LAYER_NORM_EPS = 1e-5  # torch's default, and GPT-2's layer_norm_epsilon


# ------------------------------------------------------------------------- context rule
# One rule for the whole project: the model never sees more than block_size tokens.
# A prompt longer than that keeps its last block_size tokens. When generation fills the
# window, the older half is dropped at once (as llama.cpp's context shift does), so the
# window is re-read once every block_size // 2 tokens instead of for every new token.
# generate() below and inference_gguf.py both call this, so their greedy texts are equal.

def tokens_kept_on_shift(block_size: int) -> int:
    return max(1, block_size // 2)


def fit_prompt(tokens: list, block_size: int) -> list:
    """The window a prompt starts with."""
    return list(tokens[-block_size:])


def slide(window: list, block_size: int) -> list:
    """The window after a new token was appended to it."""
    if len(window) <= block_size:
        return window
    return window[-tokens_kept_on_shift(block_size):]


# ------------------------------------------------------------------------------- model

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config["n_head"]
        self.dropout = config["dropout"]
        self.c_attn = nn.Linear(config["n_embd"], 3 * config["n_embd"])  # fused q, k, v
        self.c_proj = nn.Linear(config["n_embd"], config["n_embd"])
        self.resid_dropout = nn.Dropout(config["dropout"])

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # On CPU the fused attention kernel is several times slower in bfloat16 than in float32
        # (benchmarks/bench_step.py), so under bf16 autocast it runs in float32.
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_autocast:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(  # scale 1/sqrt(head_dim), as GPT-2
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config["n_embd"], 4 * config["n_embd"])
        self.c_proj = nn.Linear(4 * config["n_embd"], config["n_embd"])
        self.dropout = nn.Dropout(config["dropout"])

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config["n_embd"], eps=LAYER_NORM_EPS)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config["n_embd"], eps=LAYER_NORM_EPS)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTLanguageModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}")
        if config["n_embd"] % config["n_head"]:
            raise ValueError(f"n_embd {config['n_embd']} is not divisible by n_head {config['n_head']}")
        self.config = dict(config)
        self.block_size = config["block_size"]
        self.wte = nn.Embedding(config["vocab_size"], config["n_embd"])
        self.wpe = nn.Embedding(config["block_size"], config["n_embd"])
        self.drop = nn.Dropout(config["dropout"])
        self.h = nn.ModuleList(Block(config) for _ in range(config["n_layer"]))
        self.ln_f = nn.LayerNorm(config["n_embd"], eps=LAYER_NORM_EPS)
        self.lm_head = nn.Linear(config["n_embd"], config["vocab_size"], bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections that feed the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config["n_layer"]))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue each sequence in idx (B, T) by max_new_tokens tokens, following the
        context rule above. temperature 0 is greedy. Keys and values of the window are cached,
        so each new token costs one position, not a pass over the whole window."""
        was_training = self.training
        self.eval()
        out = idx
        windows = [fit_prompt(row.tolist(), self.block_size) for row in idx]
        cache = []
        logits = self._forward_cached(torch.tensor(windows, dtype=torch.long, device=idx.device), cache)
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k)
            out = torch.cat((out, next_token), dim=1)
            if step == max_new_tokens - 1:
                break
            # Windows of one batch always have equal lengths, as they slide in step.
            grown = [slide(w + [t], self.block_size) for w, t in zip(windows, next_token[:, 0].tolist())]
            if len(grown[0]) == len(windows[0]) + 1:
                logits = self._forward_cached(next_token, cache)   # room left: one more position
            else:
                # The kept half moves to positions 0.. : its cached keys (made at other
                # positions) no longer apply, so it is encoded again from scratch.
                cache = []
                logits = self._forward_cached(torch.tensor(grown, dtype=torch.long, device=idx.device), cache)
            windows = grown
        self.train(was_training)
        return out

    def _forward_cached(self, idx, cache: list):
        """Last-position logits (B, vocab) of idx (B, T), which continues the tokens whose keys
        and values are in cache (one (k, v) pair per layer; an empty list to start); appends
        idx's keys and values to cache. Either a window from position 0, or one token at a time."""
        B, T = idx.shape
        past = cache[0][0].size(2) if cache else 0
        assert past == 0 or T == 1, "a cached forward takes a fresh window or a single token"
        x = self.wte(idx) + self.wpe(torch.arange(past, past + T, device=idx.device))
        for layer, block in enumerate(self.h):
            attn, C = block.attn, x.size(-1)
            q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
            if past:
                k, v = torch.cat((cache[layer][0], k), dim=2), torch.cat((cache[layer][1], v), dim=2)
                cache[layer] = (k, v)
            else:
                cache.append((k, v))
            # A single new token may attend to every cached position: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            x = x + attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(self.ln_f(x[:, -1, :])).float()


def sample_next(logits, temperature=1.0, top_k=None):
    """(B, vocab) logits -> (B, 1) token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


# ----------------------------------------------------------------------- saved files

def load_weights_only(path: str, fix: str):
    """torch.load that never runs code from the file: anything but tensors and plain data is
    refused (weights_only=True), as is a damaged file, each with one line saying what to do."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before refusing; the refusal is the message
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        reason = "it holds objects other than weights, refused for safety" \
            if "weights_only" in str(err) or "Unsupported global" in str(err) else "truncated or damaged"
        raise UserError(f"{path} cannot be loaded ({reason}): {fix}") from None


def load_config(path="model_config.pth") -> dict:
    """model_config.pth as a dict, with a one-line error for every way it can be wrong."""
    config = load_weights_only(path, "create it with `python llm_model.py`")
    if not isinstance(config, dict) or any(k not in config for k in CONFIG_KEYS):
        raise UserError(f"{path} is not a model config (expected keys {', '.join(CONFIG_KEYS)}): "
                        "recreate it with `python llm_model.py`")
    return config


def load_trained_model(model_path: str, config: dict) -> GPTLanguageModel:
    """The trained model in eval mode, or a one-line error naming what does not fit."""
    state = load_weights_only(model_path, "train a model with `python train_llm.py`")
    model = GPTLanguageModel(config)
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise UserError(f"{model_path} is not a model state_dict: retrain with `python train_llm.py`")
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"{model_path} lacks tensor {name}: it was trained for another model config")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"{model_path} does not match the config: tensor {name} has shape "
                            f"{tuple(state[name].shape)}, the config needs {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"{model_path} has tensors this model does not ({', '.join(unexpected[:3])}): "
                        "it was trained for another model config")
    model.load_state_dict(state)
    return model.eval()


def save_config(config: dict, path="model_config.pth") -> None:
    with atomic_path(path) as tmp:
        torch.save(dict(config), tmp)


def count_parameters(config: dict) -> int:
    """Without building the model: embeddings, blocks, final norm, head."""
    V, C, L, T = config["vocab_size"], config["n_embd"], config["n_layer"], config["block_size"]
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_block + 2 * C + C * V


def training_memory_bytes(config: dict, batch_size: int) -> int:
    """A rough upper estimate of training memory: float32 weights, gradients and two AdamW
    moments (16 bytes per parameter), plus activations kept for the backward pass."""
    B, T, C, L = batch_size, config["block_size"], config["n_embd"], config["n_layer"]
    activations = 4 * B * T * (L * (20 * C + 2 * config["n_head"] * T) + 3 * config["vocab_size"])
    return 16 * count_parameters(config) + activations


def check_memory(config: dict, batch_size: int = 32) -> None:
    """Refuse, before allocating anything, a model that cannot fit in this machine's memory."""
    import psutil
    needed = training_memory_bytes(config, batch_size)
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        raise UserError(f"this model needs about {needed / 2**30:.1f} GiB to train at batch size {batch_size} "
                        f"({count_parameters(config) / 1e6:,.0f}M parameters) but only "
                        f"{available / 2**30:.1f} GiB is free: choose fewer layers, a smaller n_embd or "
                        "block_size, or a smaller batch", 2)


# ------------------------------------------------------------------------------ script

def tokenizer_kind(text: str) -> str:
    if text.strip().lower() not in ("char", "bpe"):
        raise ValueError(f"{text!r} is not a tokenizer kind: choose char or bpe")
    return text.strip().lower()


def questions():
    def divides_n_embd(n_head, answers):
        n_embd = answers["n_embd"]
        if n_embd % n_head:
            return f"n_embd {n_embd} is not divisible by n_head {n_head}; pick a divisor such as " \
                   + ", ".join(str(d) for d in (1, 2, 4, 8, 16) if n_embd % d == 0)
        return None

    return [
        Question("vocab_size", "Vocabulary size (train_llm.py sets the real one)", 10000, positive_int),
        Question("n_embd", "Embedding size (n_embd)", 256, positive_int),
        Question("n_head", "Number of attention heads (n_head)", 8, positive_int, divides_n_embd),
        Question("n_layer", "Number of layers (n_layer)", 6, positive_int),
        Question("block_size", "Context length in tokens (block_size)", 128, positive_int),
        Question("dropout", "Dropout", 0.1, fraction),
        Question("tokenizer", "Tokenizer: char (one token per character) or bpe (trained on your text)",
                 "char", tokenizer_kind),
    ]


def main():
    parser = ArgumentParser(description="Choose the shape of your GPT and save it.")
    qs = questions()
    add_question_flags(parser, qs)
    parser.add_argument("--output", default="model_config.pth", help="where to save the config")
    args = parser.parse_args()

    config = ask("Configure your LLM model:", qs, args)
    check_memory(config)
    save_config(config, args.output)
    print(f"Model with {count_parameters(config) / 1e6:.2f}M parameters "
          f"(at vocab_size {config['vocab_size']}) saved to {args.output}")


if __name__ == "__main__":
    run(main)
