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
from custom_llm.muon import Muon
from llm_model import CONFIG_KEYS, load_weights_only


def learning_rate_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
                     min_lr_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio × the peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model, learning_rate: float, weight_decay: float, device: str, kind: str = "muon",
                   orthogonalize_dtype=torch.float32):
    """The optimizer for a training run.

    muon (the default): Muon for the weight matrices inside the transformer blocks, AdamW for the
    embeddings, the output head, biases and LayerNorms. Muon orthogonalizes each matrix's update
    (Newton-Schulz iterations); with "match_rms_adamw" its step is scaled to AdamW's size, so one
    learning rate serves both. On tinyshakespeare it reaches a given validation loss with about
    half the tokens AdamW needs (benchmarks/bench_training.py). Its orthogonalization runs in
    orthogonalize_dtype: bfloat16 only where this machine multiplies bfloat16 matrices fast.
    adamw: AdamW for everything.
    Weight decay applies to matrices only, never to biases or LayerNorms."""
    named = list(model.named_parameters())
    block_matrices = [p for name, p in named if p.dim() == 2 and name.startswith("h.")]
    other_matrices = [p for name, p in named if p.dim() == 2 and not name.startswith("h.")]
    vectors = [p for name, p in named if p.dim() < 2]

    def adamw(matrices):
        groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.99), fused=(device == "cuda"))

    if kind == "adamw":
        return Optimizers(adamw([p for _, p in named if p.dim() == 2]))  # in model order, as checkpoints
    muon = Muon(block_matrices, orthogonalize_dtype, lr=learning_rate, weight_decay=weight_decay, momentum=0.95,
                adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw(other_matrices))


class Optimizers:
    """Several optimizers over disjoint parameters, stepped, scheduled and saved as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        saved_states = state["optimizers"] if "optimizers" in state else [state]  # an AdamW-only checkpoint
        for optimizer, saved in zip(self.optimizers, saved_states, strict=True):
            optimizer.load_state_dict(saved)


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


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 matrix products (Intel Xeon since Sapphire Rapids)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def pick_dtype(requested: str, device_type: str) -> torch.dtype:
    """auto: bfloat16 autocast on CUDA and on CPUs with AMX, where it is measured faster
    (1.4x tokens/s on a 2-core Xeon); float32 elsewhere."""
    if requested == "auto":
        return torch.bfloat16 if device_type == "cuda" or cpu_has_amx() else torch.float32
    return getattr(torch, requested)


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
