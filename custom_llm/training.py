"""The pieces of a training run that train_llm.py tells as a story: the learning-rate schedule,
the optimizer, evaluation, checkpoints and resuming, Ctrl-C, and the loss curve."""

import json
import math
import os
import signal
import sys

import numpy as np
import torch

from custom_llm.cli import UserError, atomic_path
from custom_llm.data import get_batch, random_offsets, tokenizer_hash
from llm_model import CONFIG_KEYS, load_weights_only


def learning_rate_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
                     min_lr_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio × the peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model, learning_rate: float, weight_decay: float, device: str):
    """AdamW; weight decay on matrices only (not on biases, LayerNorms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.99), fused=(device == "cuda"))


@torch.no_grad()
def estimate_loss(model, tokens, batch_size, block_size, batches, device, autocast):
    """Mean loss over the same windows every time, so evaluations are comparable step to step."""
    model.eval()
    generator = np.random.default_rng(1234)
    losses = []
    for _ in range(batches):
        x, y = get_batch(tokens, random_offsets(generator, len(tokens), block_size, batch_size), block_size, device)
        with autocast():
            losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch here; use --device cpu", 2)
    return requested


class StopRequest:
    """First Ctrl-C (or SIGTERM): finish the current step, save a checkpoint, exit 130.
    A second Ctrl-C: stop at once (files are written atomically, so none is left broken)."""

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to quit at once)...",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


def save_checkpoint(path, model, optimizer, generator, state):
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "torch_rng": torch.get_rng_state(), "numpy_rng": generator.bit_generator.state, **state}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} to resume from: start a run without --resume", 2)
    return load_weights_only(path, "start a new run without --resume")


def check_resume(checkpoint, config, tokenizer, dataset):
    """A clear error naming what differs between the checkpoint and this run."""
    for key in CONFIG_KEYS:
        if checkpoint["config"].get(key) != config.get(key):
            raise UserError(f"cannot resume: model config differs from the checkpoint's ({key} is "
                            f"{config.get(key)}, the checkpoint has {checkpoint['config'].get(key)})")
    if checkpoint["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise UserError("cannot resume: tokenizer.json differs from the one the checkpoint was trained with")
    if checkpoint["text_hash"] != dataset.text_hash:
        raise UserError(f"cannot resume: the text {checkpoint['plan']['dataset_path']} changed since the "
                        "checkpoint (its content hash differs); start a new run or use --init_from")


def plot_losses(metrics_path, plot_path):
    """Loss curve from the metrics log, drawn without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in rows], [r["train_loss"] for r in rows], label="train")
    ax.plot([r["tokens"] for r in rows], [r["val_loss"] for r in rows], label="validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(plot_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
