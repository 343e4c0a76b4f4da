"""What every architecture's model shares: its config, the KV cache, the loss, generate(), and a
vocabulary grown by rows. The graphs themselves are architecture modules (gpt2.py), chosen by the
config's "architecture" (architectures.py); build_model makes the one a config describes.

One forward pass serves training, evaluation and generation; generation passes a KVCache so each
new token costs one position."""

import dataclasses

import torch
import torch.nn as nn
from torch.nn import functional as F

from custom_llm.context import fit_prompt, slide
from custom_llm.sampling import Sampler, Settings

CONFIG_KEYS = ("vocab_size", "n_embd", "n_head", "n_layer", "block_size", "dropout")


def build_model(config: dict) -> "LanguageModel":
    """A new model of the architecture the config names (GPT-2's for configs that name none)."""
    from custom_llm.architectures import architecture_of
    return architecture_of(config).Model(config)


def count_parameters(config: dict) -> int:
    """The parameters of the model the config describes, without building it."""
    from custom_llm.architectures import architecture_of
    return architecture_of(config).count_parameters(config)


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


def language_model_loss(logits, targets):
    """Mean cross-entropy of the targets; targets of -1 are context, not trained on (a chat's
    prompts: data.IGNORED)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def samplers_for(idx, max_new_tokens, temperature, **sampling) -> list:
    """One sampler (sampling.Sampler) per row of idx, each its own stream of draws, started on its
    prompt. Without a seed, one is drawn from torch's generator, so torch.manual_seed makes the
    result reproducible."""
    settings = Settings(temperature=temperature, max_tokens=max_new_tokens, **sampling)
    if settings.seed is None and temperature != 0:
        settings.seed = int(torch.randint(2 ** 62, ()))
    samplers = []
    for row, prompt in enumerate(idx.tolist()):
        row_seed = None if settings.seed is None else settings.seed + row
        samplers.append(Sampler(dataclasses.replace(settings, seed=row_seed)))
        samplers[-1].start(prompt)
    return samplers


class LanguageModel(nn.Module):
    """The base of every architecture's model: built from a plain config dict (CONFIG_KEYS and
    the architecture's own), forward(idx, targets=None, kv_cache=None) -> (logits, loss), and the
    generate() below. wte (token embedding) and lm_head (output) are named alike in every one, so
    a vocabulary grows the same way."""

    def __init__(self, config: dict):
        super().__init__()
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}")
        if config["n_embd"] % config["n_head"]:
            raise ValueError(f"n_embd {config['n_embd']} is not divisible by n_head {config['n_head']}")
        self.config = dict(config)
        self.block_size = config["block_size"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, **sampling):
        """Continue each sequence in idx (B, T) by max_new_tokens tokens, following the context
        rule (context.py), with the sampler inference_gguf.py uses (sampling.Sampler):
        temperature (0 is greedy), top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed.
        Without a seed, one is drawn from torch's generator, so torch.manual_seed makes the
        result reproducible. Keys and values of the window are cached, so each new token costs
        one position, not a pass over the whole window."""
        samplers = samplers_for(idx, max_new_tokens, temperature, **sampling)
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
def grow_vocabulary(model: LanguageModel, vocab_size: int) -> LanguageModel:
    """The model with room for vocab_size tokens (a tokenizer grown by special tokens,
    chat_format.py): the trained rows of the embedding and the head are kept, each new row starts
    as the mean of the trained ones (a token like the average one, not a random direction)."""
    old = model.config["vocab_size"]
    if vocab_size == old:
        return model
    for layer, weight in ((model.wte, model.wte.weight), (model.lm_head, model.lm_head.weight)):
        grown = torch.cat([weight, weight.mean(0, keepdim=True).expand(vocab_size - old, -1)])
        layer.weight = nn.Parameter(grown.contiguous())
    model.wte.num_embeddings = model.lm_head.out_features = vocab_size
    model.config["vocab_size"] = vocab_size
    return model
