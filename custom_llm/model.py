"""The model: exactly GPT-2's graph (learned positions, pre-LayerNorm blocks with biases, fused
QKV, GELU with the tanh approximation, an output head without bias), so the Hugging Face and GGUF
exports are exact copies of it rather than approximations. One forward pass serves training,
evaluation and generation; generation passes a KVCache so each new token costs one position."""

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from custom_llm.context import fit_prompt, slide
from custom_llm.sampling import Sampler, Settings

CONFIG_KEYS = ("vocab_size", "n_embd", "n_head", "n_layer", "block_size", "dropout")
LAYER_NORM_EPS = 1e-5  # torch's default, and GPT-2's layer_norm_epsilon


class KVCache:
    """Keys and values of the positions seen so far, one (keys, values) pair per layer, each
    (batch, heads, positions, head_dim). A forward given the cache attends to them and adds its own."""

    def __init__(self):
        self.layers = []

    def __len__(self) -> int:
        """Positions held."""
        return self.layers[0][0].size(2) if self.layers else 0

    def extend(self, layer: int, k, v):
        """Append this layer's new keys and values; return all of them."""
        if layer == len(self.layers):
            self.layers.append((k, v))
        else:
            past_k, past_v = self.layers[layer]
            self.layers[layer] = (torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2))
        return self.layers[layer]


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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

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
        loss = None
        if targets is not None:
            # Targets of -1 are context, not trained on (a chat's prompts: data.IGNORED).
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, **sampling):
        """Continue each sequence in idx (B, T) by max_new_tokens tokens, following the context
        rule (context.py), with the sampler inference_gguf.py uses (sampling.Sampler):
        temperature (0 is greedy), top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed.
        Without a seed, one is drawn from torch's generator, so torch.manual_seed makes the
        result reproducible. Keys and values of the window are cached, so each new token costs
        one position, not a pass over the whole window."""
        settings = Settings(temperature=temperature, max_tokens=max_new_tokens, **sampling)
        if settings.seed is None and temperature != 0:
            settings.seed = int(torch.randint(2 ** 62, ()))
        samplers = []
        for row, prompt in enumerate(idx.tolist()):   # each row its own stream of draws
            row_seed = None if settings.seed is None else settings.seed + row
            samplers.append(Sampler(dataclasses.replace(settings, seed=row_seed)))
            samplers[-1].start(prompt)
        was_training = self.training
        self.eval()
        windows = [fit_prompt(row, self.block_size) for row in idx.tolist()]
        cache, feed, new = KVCache(), windows, []
        for step in range(max_new_tokens):
            logits = self(torch.tensor(feed, dtype=torch.long, device=idx.device), kv_cache=cache)[0][:, -1]
            tokens = [sample(row) for sample, row in zip(samplers, logits.float().cpu().numpy())]
            new.append(tokens)
            # Windows of one batch always have equal lengths, as they slide in step.
            grown = [slide(w + [t], self.block_size) for w, t in zip(windows, tokens)]
            if len(grown[0]) == len(windows[0]) + 1:
                feed = [[t] for t in tokens]   # room left: one more position
            else:
                # The kept half moves to positions 0.. : its cached keys (made at other
                # positions) no longer apply, so it is encoded again from scratch.
                cache, feed = KVCache(), grown
            windows = grown
        self.train(was_training)
        if not new:
            return idx
        return torch.cat((idx, torch.tensor(new, dtype=idx.dtype, device=idx.device).T), dim=1)


@torch.no_grad()
def grow_vocabulary(model: GPTLanguageModel, vocab_size: int) -> GPTLanguageModel:
    """The model with room for vocab_size tokens (a tokenizer grown by special tokens, chat.py):
    the trained rows of the embedding and the head are kept, each new row starts as the mean of
    the trained ones (a token like the average one, not a random direction)."""
    old = model.config["vocab_size"]
    if vocab_size == old:
        return model
    for layer, weight in ((model.wte, model.wte.weight), (model.lm_head, model.lm_head.weight)):
        grown = torch.cat([weight, weight.mean(0, keepdim=True).expand(vocab_size - old, -1)])
        layer.weight = nn.Parameter(grown.contiguous())
    model.wte.num_embeddings = model.lm_head.out_features = vocab_size
    model.config["vocab_size"] = vocab_size
    return model


def count_parameters(config: dict) -> int:
    """Without building the model: embeddings, blocks, final norm, head."""
    V, C, L, T = config["vocab_size"], config["n_embd"], config["n_layer"], config["block_size"]
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_block + 2 * C + C * V
