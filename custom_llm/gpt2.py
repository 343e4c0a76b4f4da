"""The GPT-2 architecture, whole: its graph, its Hugging Face form (GPT2LMHeadModel) and its GGUF
form (llama.cpp's gpt2). The graph is exactly GPT-2's (learned positions, pre-LayerNorm blocks with
biases, fused QKV, GELU with the tanh approximation, an output head without bias), so both exports
are exact copies of its weights under other names: no retraining, no approximation.

Learned positions end at the trained block: past it, this model follows the context rule
(context.py), and its GGUF carries extra position rows so front ends that do not slide never
crash (docs/context.md)."""

import contextlib
import math
import re

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from custom_llm.model import LanguageModel, language_model_loss

NAME = "gpt2"              # the config's "architecture"
GGUF_ARCH = "gpt2"         # llama.cpp's architecture name
LAYER_NORM_EPS = 1e-5      # torch's default, and GPT-2's layer_norm_epsilon
TRAIN_WINDOWS = 1          # learned positions end at the block: a training row is one block
CHECK_WINDOWS = 1          # and so is the export checks' pass
# Bytes the backward pass keeps per token, per layer and per unit of n_embd (memory.py), float32
# and bfloat16 autocast: peak RSS of short runs on a CPU, attention in PyTorch's fused kernel
# (tests/test_training.py checks the estimate against a real run).
ACTIVATION_BYTES = {False: 90, True: 68}


# ------------------------------------------------------------------ the graph

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        self.layer = layer  # its place in a KVCache
        self.n_head = config["n_head"]
        self.c_attn = nn.Linear(config["n_embd"], 3 * config["n_embd"])  # fused q, k, v
        self.c_proj = nn.Linear(config["n_embd"], config["n_embd"])
        self.resid_dropout = nn.Dropout(config["dropout"])

    def forward(self, x, kv_cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.extend(self.layer, k, v)
        past = k.size(2) - T
        # New positions attend to every cached one and causally among themselves; a single new
        # token needs no mask at all.
        mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past) if past and T > 1 else None
        # On CPU the fused attention kernel is slower in bfloat16 than in float32
        # (benchmarks/bench_step.py), so under bf16 autocast it runs in float32. No dropout on the
        # attention weights: with it, PyTorch's CPU attention falls back from the fused kernel to
        # one that stores every attention matrix (40% slower steps and +40% memory, measured);
        # dropout still applies to the embeddings and to each block's two outputs.
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_autocast:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(  # scale 1/sqrt(head_dim), as GPT-2
                q, k, v, attn_mask=mask, is_causal=past == 0)
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
    def __init__(self, config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config["n_embd"], eps=LAYER_NORM_EPS)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config["n_embd"], eps=LAYER_NORM_EPS)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class Model(LanguageModel):
    def __init__(self, config: dict):
        super().__init__(config)
        self.wte = nn.Embedding(config["vocab_size"], config["n_embd"])
        self.wpe = nn.Embedding(config["block_size"], config["n_embd"])
        self.drop = nn.Dropout(config["dropout"])
        self.h = nn.ModuleList(Block(config, layer) for layer in range(config["n_layer"]))
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

    def forward(self, idx, targets=None, kv_cache=None):
        """(logits (B, T, vocab), loss or None) for idx (B, T). With a kv_cache, idx continues
        the positions the cache holds (an empty KVCache starts at position 0)."""
        B, T = idx.shape
        past = len(kv_cache) if kv_cache is not None else 0
        if past + T > self.block_size:
            raise ValueError(f"positions {past} to {past + T - 1} reach past block_size {self.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x, kv_cache)
        logits = self.lm_head(self.ln_f(x))
        return logits, None if targets is None else language_model_loss(logits, targets)


def count_parameters(config: dict) -> int:
    """Without building the model: embeddings, blocks, final norm, head."""
    V, C, L, T = config["vocab_size"], config["n_embd"], config["n_layer"], config["block_size"]
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_block + 2 * C + C * V


# ------------------------------------------------------------------ Hugging Face: GPT2LMHeadModel

# Modules that GPT-2 stores as Conv1D, i.e. with weights transposed relative to nn.Linear.
CONV1D_WEIGHTS = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
HF_PREFIX = "transformer."
# GPT-2's causal-mask buffers (h.N.attn.bias, not h.N.attn.c_attn.bias): not weights, and our
# attention needs none.
HF_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def hf_state_dict(model) -> dict:
    """Our state_dict -> GPT2LMHeadModel's (names under transformer., Conv1D weights transposed)."""
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        if CONV1D_WEIGHTS.fullmatch(name):
            tensor = tensor.t()
        state[name if name == "lm_head.weight" else HF_PREFIX + name] = tensor.contiguous()
    return state


def state_dict_from_hf(hf_state: dict) -> dict:
    """GPT2LMHeadModel's state_dict -> ours: hf_state_dict's inverse. A tied head (GPT-2's own)
    becomes a copy of the token embedding, which fine-tuning then trains on its own."""
    state = {}
    for hf_name, tensor in hf_state.items():
        name = hf_name[len(HF_PREFIX):] if hf_name.startswith(HF_PREFIX) else hf_name
        if HF_BUFFER.fullmatch(hf_name):
            continue
        tensor = tensor.detach().float()
        state[name] = (tensor.t() if CONV1D_WEIGHTS.fullmatch(name) else tensor).contiguous().clone()
    if "lm_head.weight" not in state and "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"].clone()
    return state


def hf_model(model, end_of_text: int):
    """A GPT2LMHeadModel holding the model's weights (untied head, as ours)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = model.config
    hf_config = GPT2Config(
        vocab_size=config["vocab_size"], n_positions=config["block_size"], n_embd=config["n_embd"],
        n_layer=config["n_layer"], n_head=config["n_head"], n_inner=4 * config["n_embd"],
        activation_function="gelu_new", layer_norm_epsilon=LAYER_NORM_EPS,
        resid_pdrop=config["dropout"], embd_pdrop=config["dropout"], attn_pdrop=0.0,  # as the model trains
        bos_token_id=end_of_text, eos_token_id=end_of_text, tie_word_embeddings=False)
    exported = GPT2LMHeadModel(hf_config)
    missing, unexpected = exported.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not HF_BUFFER.fullmatch(k)]
    if missing or unexpected:
        raise RuntimeError(f"HF export mapping is incomplete: missing {missing}, unexpected {unexpected}")
    return exported


# ------------------------------------------------------------------ GGUF: llama.cpp's gpt2

def gguf_tensor_name(name: str) -> str:
    """Our parameter names -> llama.cpp's gpt2 tensor names."""
    fixed = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    block = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if not block:
        raise KeyError(f"no GGUF name for parameter {name}")
    layer, module, kind = block.groups()
    gguf_module = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                   "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}[module]
    return f"blk.{layer}.{gguf_module}.{kind}"


# The position table past the trained block. A gpt2 GGUF has one learned position row per
# position, and llama.cpp aborts the whole process (GGML_ASSERT in get_rows) when it reaches a
# position the table lacks. Front ends that do not slide a window (llama.cpp's tools, Ollama,
# LM Studio, llama-cpp-python's Llama) run up to their context, 512 to 4096 tokens by default,
# and llama.cpp rounds any context up to a multiple of 256. So the file carries GGUF_CONTEXT rows:
# the trained ones unchanged, then rows made by POSITION_RULE (docs/context.md: the rules measured).
GGUF_CONTEXT = 4096
POSITION_RULE = "clamp"


def gguf_context_length(block_size: int) -> int:
    """Rows of the GGUF's position table (its context_length): at least GGUF_CONTEXT and the
    block size, rounded up to the multiple of 256 llama.cpp gives a context of block_size."""
    return -(-max(block_size, GGUF_CONTEXT) // 256) * 256


def _tile(table, rows):
    """Row p is trained row p mod block: the table repeated."""
    return table[np.arange(rows) % len(table)]


def _clamp(table, rows):
    """Every row past the block is the last trained row."""
    return table[np.minimum(np.arange(rows), len(table) - 1)]


def _last_half(table, rows):
    """Past the block, the last half of the trained rows repeated."""
    block, half = len(table), len(table) // 2
    p = np.arange(rows)
    return table[np.where(p < block, p, half + (p - half) % (block - half))]


def _linear(table, rows):
    """Past the block, the straight line fitted (per dimension) to the last quarter of the rows."""
    block = len(table)
    fit = np.arange(block - max(2, block // 4), block)
    slope, intercept = np.polyfit(fit, table[fit].astype(np.float64), 1)
    p = np.arange(block, rows)[:, None]
    return np.concatenate([table, (intercept + slope * p).astype(table.dtype)])


POSITION_RULES = {"tile": _tile, "clamp": _clamp, "last_half": _last_half, "linear": _linear}
RULE_WORDS = {"tile": "repeat the trained rows (row p is row p mod {block})",
              "clamp": "repeat the last trained row",
              "last_half": "repeat the last half of the trained rows",
              "linear": "extend a straight line through the last quarter of the trained rows"}


def extended_positions(table: np.ndarray, rows: int, rule: str = POSITION_RULE) -> np.ndarray:
    """The position table with `rows` rows: the trained rows unchanged, then rule's rows."""
    if rows <= len(table):
        return table[:rows]
    return POSITION_RULES[rule](table, rows)


def describe_context(block: int, rows: int, rule: str) -> str:
    """general.description: what a front end gets past the trained block."""
    if rows <= block:
        return f"GPT-2-architecture model trained on a context of {block} tokens."
    return (f"GPT-2-architecture model trained on a context of {block} tokens. Positions {block} to "
            f"{rows - 1} {RULE_WORDS[rule].format(block=block)}, so a context of up to {rows} tokens "
            f"runs without error, but text past {block} tokens is not what the model learned; for the "
            f"trained quality keep the context at {block} or slide a window of {block} tokens "
            f"(inference_gguf.py does). Contexts above {rows} abort llama.cpp at position {rows}.")


def add_gguf_model(writer, model, matrix_type, context_length=None, position_rule: str = POSITION_RULE) -> None:
    """The architecture's metadata and tensors, to a GGUFWriter made with GGUF_ARCH; matrices in
    matrix_type (numpy float32 or float16), vectors float32 as llama.cpp expects. The position
    table has context_length rows (default gguf_context_length(block size)): llama.cpp sizes
    position_embd by gpt2.context_length, so the two must be equal."""
    from custom_llm import gguf_keys
    config = model.config
    block = config["block_size"]
    rows = context_length or gguf_context_length(block)
    writer.add_description(describe_context(block, rows, position_rule))
    writer.add_context_length(rows)
    writer.add_uint32(gguf_keys.TRAINED_CONTEXT, block)
    writer.add_string(gguf_keys.POSITION_RULE, position_rule if rows > block else "none")
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    for param_name, tensor in model.state_dict().items():
        array = tensor.detach().float().cpu().numpy()
        if param_name == "wpe.weight":
            array = extended_positions(array, rows, position_rule)
        writer.add_tensor(gguf_tensor_name(param_name), array.astype(matrix_type) if array.ndim == 2 else array)
