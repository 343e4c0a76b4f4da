"""What quantization costs: perplexity and next-token agreement on held-out text, computed on
identical windows for the PyTorch model and for each GGUF through llama.cpp.

Windows: the tokens are cut into non-overlapping windows of block_size tokens (stride
block_size); a window's logits at position i predict the token after it, so every token but
the first is predicted exactly once, with 0 to block_size - 1 tokens of context before it.
Perplexity is exp(mean negative log-likelihood) over all predicted tokens.
"""

from dataclasses import dataclass

import numpy as np


def evaluation_windows(tokens, block_size: int, max_tokens: int = 0) -> list:
    """[(inputs, targets)] covering tokens (at most max_tokens of them when max_tokens > 0)."""
    tokens = list(tokens[:max_tokens] if max_tokens else tokens)
    windows = []
    for start in range(0, len(tokens) - 1, block_size):
        targets = tokens[start + 1:start + block_size + 1]
        windows.append((tokens[start:start + len(targets)], targets))
    return windows


@dataclass
class Scores:
    nll: np.ndarray     # negative log-likelihood of each predicted token (nats)
    top1: np.ndarray    # the model's likeliest next token at each position

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    def agreement(self, other: "Scores") -> float:
        return float((self.top1 == other.top1).mean())


def score(logits_of, windows) -> Scores:
    """logits_of(inputs) -> (len(inputs), vocab) logits."""
    nll, top1 = [], []
    for inputs, targets in windows:
        logits = np.asarray(logits_of(inputs), dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        nll.append(-log_probs[np.arange(len(targets)), targets])
        top1.append(logits.argmax(axis=-1))
    return Scores(np.concatenate(nll), np.concatenate(top1))


def pytorch_logits(model):
    import torch

    def logits_of(inputs):
        with torch.no_grad():
            return model(torch.tensor([inputs]))[0][0].float().numpy()
    return logits_of


def report_table(rows) -> str:
    """A Markdown table. rows: dicts with name, size, bpw, perplexity, ratio, agreement
    (None where it does not apply, e.g. file size of the PyTorch model)."""
    from custom_llm.resources import human_bytes

    def cell(value, fmt):
        return "" if value is None else fmt(value)

    lines = ["| type | file size | bits/weight | perplexity | ratio to PyTorch | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {cell(r['size'], human_bytes)} | {cell(r['bpw'], '{:.2f}'.format)} "
                     f"| {r['perplexity']:.4f} | {cell(r['ratio'], '{:.4f}'.format)} "
                     f"| {cell(r['agreement'], lambda a: f'{100 * a:.2f}%')} |")
    return "\n".join(lines)
