"""The windowed model: relative positions (rotary) and a sliding attention window of block_size
tokens on every layer, so the model computes the same thing at any length, in training and in
every reader. Its graph is exactly OLMo 3's (docs/windowed.md: why this architecture), so its two
exports are copies of its weights under other names, not approximations:

  * Hugging Face: Olmo3ForCausalLM with every layer "sliding_attention" (hf_model);
  * GGUF: llama.cpp's `olmo2` architecture, every layer of ours windowed by
    `olmo2.attention.sliding_window_pattern`, with identity blocks (all weights zero) where a
    llama.cpp that ignores that key runs olmo2 layers in full, and one at the end that keeps
    llama.cpp's context shift working (gguf_layers, add_gguf_metadata, add_gguf_tensors).

The graph, per block (no biases anywhere, no learned positions):

    q, k, v = RMSNorm(x Wq), RMSNorm(x Wk), x Wv        # q/k norms over the whole width
    q, k    = rotary(q), rotary(k)                       # rotate_half convention, per head
    x = x + RMSNorm(attention(q, k, v) Wo)                # norms AFTER each sublayer
    x = x + RMSNorm((silu(x Wgate) * x Wup) Wdown)

then a final RMSNorm and an untied output matrix. Token t attends to tokens t-block_size+1..t:
block_size keys, itself included.
"""

import contextlib
import math
import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F

from custom_llm.model import CONFIG_KEYS, LanguageModel, language_model_loss, samplers_for

NAME = "windowed"          # the config's "architecture"
# Sequences a training row holds, in windows of block_size (config["train_windows"]): several, so
# that tokens late in a row see keys computed with their own earlier context, as in a reader that
# runs on past the block (docs/windowed.md: train as it will be read).
TRAIN_WINDOWS = 4
# The export checks compare logits over this many windows in one pass (checks.py).
CHECK_WINDOWS = 8
# Bytes the backward pass keeps per token, per layer and per unit of n_embd (memory.py), float32
# and bfloat16 autocast: 2.3 to 2.6 times GPT-2's (four RMSNorms and rotary positions on the way,
# keys and values unfolded into blocks twice their length, SwiGLU's three activations). Peak RSS
# growth of two training steps, n_embd 128 and 256, rows of 1, 4 and 8 windows of 64, AMD EPYC
# Zen 5: 149 to 226 in float32, 152 to 162 with bfloat16 (the largest, rounded up).
ACTIVATION_BYTES = {False: 230, True: 165}
DEFAULTS = {
    "rope_theta": 10000.0,   # rotary base; llama.cpp and transformers both read it from the export
    "norm_eps": 1e-5,        # every RMSNorm's epsilon
    "n_ff": None,            # MLP width; None: ffn_width(n_embd)
}

# Under CPU bfloat16 autocast, RMSNorm gets bfloat16 input and a float32 weight, and PyTorch warns
# (once per process, on stderr) that it takes its unfused path: the result is right, the warning noise.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

# The GGUF architecture and the transformers class that run this graph with a window on every layer.
GGUF_ARCH = "olmo2"
HF_MODEL_TYPE = "olmo3"
# What a GGUF tells front ends its context is (<arch>.context_length). Any length runs the trained
# model; this is how many positions a front end that sizes its cache from the file (llama-server,
# llama-cli and llama-cpp-python at n_ctx 0; Ollama caps its num_ctx at it) holds before it must
# shift or free the cache (docs/windowed.md: when the context fills). llama.cpp's tools then cache
# the window of each windowed layer (llama-cpp-python's Llama asks for full-size ones) and this
# many positions for the one full-attention block, an identity.
GGUF_CONTEXT = 4096


def ffn_width(n_embd: int) -> int:
    """The SwiGLU MLP's width: 8/3 n_embd (as many weights as GPT-2's 4 x n_embd MLP), rounded up
    to a multiple of 32 so every matrix row splits into llama.cpp's quantization blocks."""
    return 32 * math.ceil(8 * n_embd / 3 / 32)


def full_config(config: dict) -> dict:
    """config with this architecture's keys filled in from DEFAULTS, checked."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}")
    config = {**DEFAULTS, **config}
    if config["n_ff"] is None:
        config["n_ff"] = ffn_width(config["n_embd"])
    if config["n_embd"] % config["n_head"]:
        raise ValueError(f"n_embd {config['n_embd']} is not divisible by n_head {config['n_head']}")
    if (config["n_embd"] // config["n_head"]) % 2:
        raise ValueError(f"head size {config['n_embd'] // config['n_head']} is odd: rotary positions "
                         "turn pairs of dimensions")
    return config


# --------------------------------------------------------------------------- positions

def rotary_angles(positions, head_dim: int, theta: float, device=None):
    """(cos, sin), each (T, head_dim): the angles of each position, computed once per forward
    pass and shared by every layer's queries and keys."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32, device=device) / half))
    angles = positions.float()[:, None] * inv_freq[None, :]             # (T, half)
    return angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)


def rotary(x, angles):
    """x (B, heads, T, head_dim) turned by each position's angles (rotary_angles): dimension i is
    paired with i + head_dim/2 (transformers' rotate_half, llama.cpp's NEOX rope)."""
    cos, sin = angles
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def window_mask(query_positions, key_positions, window: int):
    """(T, S) bool, True where a query may see a key: the key is at most window - 1 positions
    earlier (window keys, the query's own included)."""
    distance = query_positions[:, None] - key_positions[None, :]
    return (distance >= 0) & (distance < window)


def blocked_attention(q, k, v, window: int):
    """Windowed causal attention over a long sequence (no cache), in blocks of window queries,
    each against its own block and the one before it (2 x window keys): the cost grows with the
    length, not with its square. The blocks are folded into the batch, so the tensors stay 4-D
    and PyTorch's fused CPU kernel runs them (a 5-D call fell back to its unfused path: a third
    slower training on the benchmark model)."""
    B, H, T, D = q.shape
    n = -(-T // window)                          # blocks; the last one is padded at the end
    pad = n * window - T
    q = F.pad(q, (0, 0, 0, pad)).unflatten(2, (n, window)).transpose(1, 2).flatten(0, 1)  # (B n, H, window, D)
    k, v = (F.pad(t, (0, 0, window, pad)).unfold(2, 2 * window, window).permute(0, 2, 1, 4, 3).flatten(0, 1)
            for t in (k, v))                     # (B n, H, 2 window, D), a zero block before the first
    query_positions = torch.arange(window, device=q.device)[:, None] + window
    key_positions = torch.arange(2 * window, device=q.device)[None, :]
    distance = query_positions - key_positions
    inside = (distance >= 0) & (distance < window)                         # every block but the first
    first = inside & (key_positions >= window)                             # the first: no block before
    mask = torch.stack((first, *[inside] * (n - 1))).repeat(B, 1, 1)[:, None]   # (B n, 1, window, 2 window)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)[:, :, :T]


class WindowCache:
    """Keys (rotated) and values of the last window - 1 positions, one pair per layer, each
    (B, heads, positions, head_dim): all the next token can see besides itself. Positions keep
    counting up (rotary positions are relative), so nothing is ever evaluated twice."""

    def __init__(self, window: int):
        self.keep = window - 1
        self.layers = []
        self.position = 0          # the position of the next token

    def __len__(self) -> int:
        """Positions held."""
        return self.layers[0][0].size(2) if self.layers else 0

    def extend(self, layer: int, k, v):
        """This layer's cached keys and values followed by the new ones (what the new queries
        attend to); the cache then keeps the last window - 1 of them."""
        if layer < len(self.layers):
            past_k, past_v = self.layers[layer]
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        first = max(0, k.size(2) - self.keep)
        kept = (k[:, :, first:], v[:, :, first:])
        if layer < len(self.layers):
            self.layers[layer] = kept
        else:
            self.layers.append(kept)
        return k, v


# ------------------------------------------------------------------------------ blocks

class WindowedAttention(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        C = config["n_embd"]
        self.layer = layer                  # its place in a WindowCache
        self.n_head = config["n_head"]
        self.window = config["block_size"]
        self.q = nn.Linear(C, C, bias=False)
        self.k = nn.Linear(C, C, bias=False)
        self.v = nn.Linear(C, C, bias=False)
        self.o = nn.Linear(C, C, bias=False)
        self.q_norm = nn.RMSNorm(C, eps=config["norm_eps"])
        self.k_norm = nn.RMSNorm(C, eps=config["norm_eps"])

    def forward(self, x, positions, angles, kv_cache=None):
        """positions: (T,) of x's tokens; angles: rotary_angles of them."""
        B, T, C = x.shape
        q, k, v = self.q_norm(self.q(x)), self.k_norm(self.k(x)), self.v(x)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = rotary(q, angles), rotary(k, angles)
        if kv_cache is not None:
            k, v = kv_cache.extend(self.layer, k, v)
        past = k.size(2) - T
        # Where every key is in every query's window, causal order is the whole mask (and one new
        # token after the cache needs none); otherwise the window's band.
        mask, causal = None, past == 0 and T > 1
        if past + T > self.window or (past and T > 1):
            causal = False
            key_positions = positions[0] - past + torch.arange(past + T, device=x.device)
            mask = window_mask(positions, key_positions, self.window)
        # Under CPU bf16 autocast, attention runs in float32 (faster there, as in model.py). No
        # dropout on the attention weights (it would cost PyTorch's fused CPU kernel).
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_autocast:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
            if past == 0 and T > 2 * self.window:
                y = blocked_attention(q, k, v, self.window)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, F_ = config["n_embd"], config["n_ff"]
        self.gate = nn.Linear(C, F_, bias=False)
        self.up = nn.Linear(C, F_, bias=False)
        self.down = nn.Linear(F_, C, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        self.attn = WindowedAttention(config, layer)
        self.attn_norm = nn.RMSNorm(config["n_embd"], eps=config["norm_eps"])
        self.mlp = SwiGLU(config)
        self.mlp_norm = nn.RMSNorm(config["n_embd"], eps=config["norm_eps"])
        self.drop = nn.Dropout(config["dropout"])

    def forward(self, x, positions, angles, kv_cache=None):
        x = x + self.drop(self.attn_norm(self.attn(x, positions, angles, kv_cache)))
        return x + self.drop(self.mlp_norm(self.mlp(x)))


# ------------------------------------------------------------------------------- model

class WindowedModel(LanguageModel):
    def __init__(self, config: dict):
        super().__init__(config)
        config = full_config(config)
        self.config = config
        self.wte = nn.Embedding(config["vocab_size"], config["n_embd"])
        self.drop = nn.Dropout(config["dropout"])
        self.h = nn.ModuleList(Block(config, layer) for layer in range(config["n_layer"]))
        self.ln_f = nn.RMSNorm(config["n_embd"], eps=config["norm_eps"])
        self.lm_head = nn.Linear(config["n_embd"], config["vocab_size"], bias=False)
        for p in self.parameters():
            if p.dim() == 2:   # matrices; the norms' weights start at 1
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None):
        """(logits (B, T, vocab), loss or None) for idx (B, T), T any length: each position sees
        the last block_size tokens. With a kv_cache (WindowCache), idx continues the positions
        the cache has seen."""
        B, T = idx.shape
        start = kv_cache.position if kv_cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)
        angles = rotary_angles(positions, self.config["n_embd"] // self.config["n_head"],
                               self.config["rope_theta"], idx.device)
        x = self.drop(self.wte(idx))
        for block in self.h:
            x = block(x, positions, angles, kv_cache)
        if kv_cache is not None:
            kv_cache.position += T
        logits = self.lm_head(self.ln_f(x))
        return logits, None if targets is None else language_model_loss(logits, targets)

    def new_cache(self) -> WindowCache:
        return WindowCache(self.block_size)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, **sampling):
        """Continue each sequence in idx (B, T) by max_new_tokens tokens with the sampler
        inference_gguf.py uses (sampling.Sampler): temperature (0 is greedy), top_k, top_p, min_p,
        repeat_penalty, repeat_last_n, seed. Without a seed, one is drawn from torch's generator,
        so torch.manual_seed makes the result reproducible. The prompt is read once, a window at
        a time; then each new token costs one position, however long the text grows."""
        samplers = samplers_for(idx, max_new_tokens, temperature, **sampling)
        if max_new_tokens <= 0:
            return idx
        if idx.size(1) == 0:
            raise ValueError("generate needs at least one token to continue")
        was_training = self.training
        self.eval()
        cache = self.new_cache()
        for start in range(0, idx.size(1) - 1, self.block_size):   # all but the last prompt token
            self(idx[:, start:min(start + self.block_size, idx.size(1) - 1)], kv_cache=cache)
        feed, new = idx[:, -1:], []
        for _ in range(max_new_tokens):
            logits = self(feed, kv_cache=cache)[0][:, -1]
            tokens = [sample(row) for sample, row in zip(samplers, logits.float().cpu().numpy())]
            new.append(tokens)
            feed = torch.tensor(tokens, dtype=idx.dtype, device=idx.device)[:, None]
        self.train(was_training)
        return torch.cat((idx, torch.tensor(new, dtype=idx.dtype, device=idx.device).T), dim=1)


Model = WindowedModel


def count_parameters(config: dict) -> int:
    """Without building the model: embeddings, blocks, final norm, head."""
    config = full_config(config)
    V, C, L, F_ = config["vocab_size"], config["n_embd"], config["n_layer"], config["n_ff"]
    per_block = 4 * C * C + 2 * C + 3 * C * F_ + 2 * C   # q k v o, q/k norms, MLP, two norms
    return V * C + L * per_block + C + C * V


# ------------------------------------------------------------------ the weights' names

# Our parameter -> (transformers Olmo3ForCausalLM's, llama.cpp olmo2's); {i} is the layer.
# Every tensor keeps its layout: nn.Linear's (out, in) is what both readers expect, and the NEOX
# rope llama.cpp applies to olmo2 is the rotate_half pairing, so q and k need no permutation.
NAMES = {
    "wte.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "ln_f.weight": ("model.norm.weight", "output_norm.weight"),
    "lm_head.weight": ("lm_head.weight", "output.weight"),
    "h.{i}.attn.q.weight": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "h.{i}.attn.k.weight": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "h.{i}.attn.v.weight": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "h.{i}.attn.o.weight": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "h.{i}.attn.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    "h.{i}.attn.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    "h.{i}.attn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",
                               "blk.{i}.post_attention_norm.weight"),
    "h.{i}.mlp.gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "h.{i}.mlp.up.weight": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "h.{i}.mlp.down.weight": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    "h.{i}.mlp_norm.weight": ("model.layers.{i}.post_feedforward_layernorm.weight",
                              "blk.{i}.post_ffw_norm.weight"),
}


def export_name(name: str, reader: str) -> str:
    """Our parameter name as reader ("hf" or "gguf") names it."""
    column = {"hf": 0, "gguf": 1}[reader]
    parts = name.split(".")
    if parts[0] == "h":
        layer, pattern = parts[1], ".".join(["h", "{i}", *parts[2:]])
        if pattern in NAMES:
            return NAMES[pattern][column].format(i=layer)
    elif name in NAMES:
        return NAMES[name][column]
    raise KeyError(f"no {reader} name for parameter {name}")


def exported_tensors(model: WindowedModel, reader: str) -> dict:
    """{reader's name: float32 tensor on the CPU} for every weight of the model."""
    return {export_name(name, reader): tensor.detach().float().cpu().contiguous()
            for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------ Hugging Face

def hf_config(config: dict, end_of_text: int = None, context_length: int = GGUF_CONTEXT):
    """The transformers Olmo3Config of this graph: every layer "sliding_attention" with a window
    of block_size (transformers' sliding_window counts the query's own key, as we do)."""
    from transformers import Olmo3Config
    config = full_config(config)
    rope = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    return Olmo3Config(
        vocab_size=config["vocab_size"], hidden_size=config["n_embd"], intermediate_size=config["n_ff"],
        num_hidden_layers=config["n_layer"], num_attention_heads=config["n_head"],
        num_key_value_heads=config["n_head"], hidden_act="silu", max_position_embeddings=context_length,
        rms_norm_eps=config["norm_eps"], attention_bias=False, attention_dropout=0.0,
        sliding_window=config["block_size"], layer_types=["sliding_attention"] * config["n_layer"],
        rope_parameters={"sliding_attention": dict(rope), "full_attention": dict(rope)},
        tie_word_embeddings=False, pad_token_id=None, bos_token_id=end_of_text, eos_token_id=end_of_text)


def hf_model(model: WindowedModel, end_of_text: int = None, context_length: int = GGUF_CONTEXT):
    """An Olmo3ForCausalLM (config + weights) that computes what model computes, in eval mode;
    save_pretrained writes a folder AutoModelForCausalLM loads offline."""
    from transformers import Olmo3ForCausalLM
    hf = Olmo3ForCausalLM(hf_config(model.config, end_of_text, context_length))
    missing, unexpected = hf.load_state_dict(exported_tensors(model, "hf"), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the Hugging Face mapping is incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


# ------------------------------------------------------------------------------ GGUF

def gguf_layers(n_layer: int) -> list:
    """The GGUF's blocks: our layer i, or None for an identity block (all its weights zero: its
    attention and MLP add exactly nothing). Identity blocks sit at every fourth place (3, 7, ...),
    where a llama.cpp that does not read sliding_window_pattern puts olmo2's full-attention
    layers, so every layer of ours is windowed there too; and one ends the file, marked
    full-attention, so llama.cpp's non-windowed cache is not empty: with it empty, shifting the
    context aborts the process (docs/windowed.md)."""
    plan = []
    while len(plan) - plan.count(None) < n_layer:
        plan.append(None if len(plan) % 4 == 3 else len(plan) - plan.count(None))
    return plan + [None]


def gguf_swa_pattern(n_layer: int) -> list:
    """sliding_window_pattern, per GGUF block: True (windowed) for all but the last identity block."""
    plan = gguf_layers(n_layer)
    return [True] * (len(plan) - 1) + [False]


def add_gguf_metadata(writer, config: dict, context_length: int = GGUF_CONTEXT) -> None:
    """The architecture's keys, for a gguf.GGUFWriter created with arch=GGUF_ARCH (the tokenizer's
    keys and general.* are the caller's)."""
    if writer.arch != GGUF_ARCH:
        raise ValueError(f"the GGUF writer is for {writer.arch!r}, this model is {GGUF_ARCH!r}")
    config = full_config(config)
    C, H = config["n_embd"], config["n_head"]
    writer.add_context_length(max(context_length, config["block_size"]))
    writer.add_embedding_length(C)
    writer.add_feed_forward_length(config["n_ff"])
    writer.add_block_count(len(gguf_layers(config["n_layer"])))
    writer.add_head_count(H)
    writer.add_head_count_kv(H)
    writer.add_rope_dimension_count(C // H)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_freq_base_swa(config["rope_theta"])       # the windowed layers' base
    writer.add_layer_norm_rms_eps(config["norm_eps"])
    writer.add_sliding_window(config["block_size"])
    writer.add_sliding_window_pattern(gguf_swa_pattern(config["n_layer"]))


def gguf_tensors(model: WindowedModel) -> dict:
    """{llama.cpp's name: float32 tensor} of every GGUF tensor, identity blocks' zeros included.
    Nothing is permuted or transposed."""
    ours = exported_tensors(model, "gguf")
    tensors = {name: t for name, t in ours.items() if not name.startswith("blk.")}
    for block, layer in enumerate(gguf_layers(model.config["n_layer"])):
        for pattern in NAMES:
            if pattern.startswith("h."):
                source = NAMES[pattern][1].format(i=0 if layer is None else layer)
                tensor = ours[source]
                tensors[NAMES[pattern][1].format(i=block)] = torch.zeros_like(tensor) if layer is None else tensor
    return tensors


def add_gguf_tensors(writer, model: WindowedModel, dtype: str = "F32") -> None:
    """The weights under llama.cpp's names (gguf_tensors): matrices in dtype (F32 or F16), norm
    weights F32 (as llama.cpp expects)."""
    import numpy as np
    if dtype not in ("F32", "F16"):
        raise ValueError(f"dtype {dtype!r}: F32 or F16 (quantize the result with llama.cpp)")
    _add_tensors(writer, model, np.float16 if dtype == "F16" else np.float32)


def _add_tensors(writer, model: WindowedModel, matrix_type) -> None:
    for name, tensor in gguf_tensors(model).items():
        array = tensor.numpy()
        writer.add_tensor(name, array.astype(matrix_type) if array.ndim == 2 else array)


def add_gguf_model(writer, model: WindowedModel, matrix_type, context_length: int = GGUF_CONTEXT) -> None:
    """The architecture's metadata and tensors (the architecture interface, export.write_gguf):
    matrices in matrix_type (numpy float32 or float16), vectors float32. The trained block is
    recorded (gguf_keys.TRAINED_CONTEXT): inference reads the window from it."""
    from custom_llm import gguf_keys
    block = model.config["block_size"]
    writer.add_description(f"Windowed model (OLMo 3's graph): rotary positions and attention to the last "
                           f"{block} tokens on every layer, the same model at any length.")
    add_gguf_metadata(writer, model.config, context_length)
    writer.add_uint32(gguf_keys.TRAINED_CONTEXT, block)
    _add_tensors(writer, model, matrix_type)
