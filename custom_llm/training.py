"""The pieces of a training run that train_llm.py tells as a story: the learning-rate schedule,
the optimizer, evaluation, Ctrl-C, the loss curve, and TrainingRun, whose methods are the training loop's
named steps (a step, evaluate-and-log, checkpoint)."""

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from custom_llm.atomic import atomic_path
from custom_llm.cli import UserError
from custom_llm.data import get_batch, random_offsets
from custom_llm.files import save_checkpoint, save_weights
from custom_llm.muon import Muon
from custom_llm.tokenizer import tokenizer_hash


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


# ------------------------------------------------------------------------------ the run

@dataclass
class StepPlan:
    """How long a run is. Each step trains on batch_size windows per process and accumulation
    step: processes × grad_accum_steps micro-batches drawn together, so the same effective batch
    gives the same training on any number of processes."""
    batch_size: int
    accumulation: int
    micro_batches: int
    tokens_per_step: int
    steps_per_epoch: int
    total_steps: int
    n_epochs: int
    warmup_steps: int

    @classmethod
    def of(cls, plan: dict, n_train_tokens: int, block_size: int, world_size: int) -> "StepPlan":
        batch_size, accumulation = plan["batch_size"], plan["grad_accum_steps"]
        micro_batches = world_size * accumulation
        tokens_per_step = batch_size * block_size * micro_batches
        steps_per_epoch = max(1, math.ceil(n_train_tokens / tokens_per_step))
        total_steps = plan["max_epochs"] * steps_per_epoch
        if plan["max_steps"]:
            total_steps = min(total_steps, plan["max_steps"])
        warmup_steps = plan["warmup_steps"] if plan["warmup_steps"] is not None else min(200, max(1, total_steps // 20))
        return cls(batch_size, accumulation, micro_batches, tokens_per_step, steps_per_epoch, total_steps,
                   math.ceil(total_steps / steps_per_epoch), warmup_steps)


class TrainingRun:
    """A training run: the model (and its compiled or distributed wrapper), the optimizer, the
    random draws, the step plan, and where the run stands. Its methods are the loop's steps."""

    def __init__(self, model, plan, dataset, processes, compile_mode: str, checkpoint=None):
        self.model, self.plan, self.dataset, self.processes = model, plan, dataset, processes
        self.block_size = model.config["block_size"]
        self.device_type = "cuda" if processes.device.startswith("cuda") else "cpu"
        self.optimizer = make_optimizer(model, plan["learning_rate"], plan["weight_decay"], self.device_type,
                                        plan["optimizer"])
        self.generator = np.random.default_rng(plan["seed"])  # the same on every process: they share the draw
        self.steps = StepPlan.of(plan, len(dataset.train), self.block_size, processes.world_size)
        self.step, self.best_val, self.best_step, self.last_eval_step = 0, float("inf"), None, 0
        self.elapsed_before, self.val_loss = 0.0, float("nan")
        if checkpoint:
            self.restore(checkpoint)
        self.use_bf16 = pick_dtype(plan["dtype"], self.device_type) == torch.bfloat16
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.compiled = compile_mode == "yes" or (compile_mode == "auto" and self.device_type == "cuda")
        self.train_model = torch.compile(model) if self.compiled else model
        if processes.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[processes.local_rank] if self.device_type == "cuda" else None)
        self.interactive = processes.is_main and sys.stderr.isatty()
        self.progress, self.epoch, self.epoch_end = None, None, None
        self.lr = self.tokens_per_s = 0.0   # of the latest step
        self.window_losses, self.epoch_losses = [], []
        self.tokens_at_start = self.step * self.steps.tokens_per_step
        self.started = self.last_checkpoint = time.time()

    def restore(self, checkpoint) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.processes.is_main:
            torch.set_rng_state(checkpoint["torch_rng"])
        self.generator.bit_generator.state = checkpoint["numpy_rng"]
        self.step, self.best_val, self.best_step = checkpoint["step"], checkpoint["best_val"], checkpoint["best_step"]
        self.last_eval_step = checkpoint.get("last_eval_step", self.step - self.step % self.plan["eval_interval"])
        self.elapsed_before = checkpoint["elapsed"]

    def summary(self) -> str:
        s, plan = self.steps, self.plan
        return (f"Training on {self.device_type} with {self.model.num_parameters() / 1e6:.2f}M parameters: "
                f"{s.n_epochs} epoch(s) of {s.steps_per_epoch} steps, {s.total_steps} steps in all; effective batch "
                f"{s.batch_size * s.micro_batches} windows ({s.tokens_per_step:,} tokens) = {s.batch_size} x "
                f"{self.processes.world_size} process(es) x {s.accumulation} accumulation step(s); "
                f"{plan['optimizer']}, peak learning rate {plan['learning_rate']:g}"
                + (", bfloat16 autocast" if self.use_bf16 else "") + (", compiled" if self.compiled else ""))

    @property
    def done(self) -> bool:
        return self.step >= self.steps.total_steps

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def elapsed(self) -> float:
        """Training seconds, this process and the runs it resumed together."""
        return self.elapsed_before + time.time() - self.started

    # ------------------------------------------------------------------- a step

    def train_step(self) -> None:
        """One optimizer step on a fresh draw of windows, at the schedule's learning rate."""
        if self.progress is None:
            self._open_epoch()
        s = self.steps
        self.lr = learning_rate_at(self.step, s.total_steps, self.plan["learning_rate"], s.warmup_steps,
                                   self.plan["min_lr_ratio"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = self._accumulate_gradients()
        if self.plan["grad_clip"] > 0:   # 0: no clipping
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.plan["grad_clip"])
        self.optimizer.step()
        self.step += 1
        self.epoch_losses.append(loss_value)
        self.window_losses.append(loss_value)
        self.tokens_per_s = (self.step * s.tokens_per_step - self.tokens_at_start) / (time.time() - self.started)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{self.tokens_per_s:,.0f}")

    def _accumulate_gradients(self) -> float:
        """Forward and backward over this process's micro-batches; returns their mean loss."""
        s, processes = self.steps, self.processes
        offsets = random_offsets(self.generator, len(self.dataset.train), self.block_size,
                                 s.batch_size * s.micro_batches)
        loss_value = 0.0
        for micro in range(s.accumulation):
            part = (micro * processes.world_size + processes.rank) * s.batch_size
            x, y = get_batch(self.dataset.train, offsets[part:part + s.batch_size], self.block_size,
                             processes.device)
            last = micro == s.accumulation - 1
            with (contextlib.nullcontext() if last or not processes.distributed else self.train_model.no_sync()):
                with self.autocast():
                    _, loss = self.train_model(x, y)
                (loss / s.accumulation).backward()
            loss_value += loss.item() / s.accumulation
        return loss_value

    # ------------------------------------------------------------------- epochs

    def _open_epoch(self) -> None:
        s = self.steps
        self.epoch = epoch = self.step // s.steps_per_epoch
        self.epoch_end = min(s.total_steps, (epoch + 1) * s.steps_per_epoch)
        self.progress = tqdm(total=self.epoch_end - epoch * s.steps_per_epoch,
                             initial=self.step - epoch * s.steps_per_epoch, desc=f"Epoch {epoch + 1}/{s.n_epochs}",
                             unit="step", dynamic_ncols=True, leave=False, disable=not self.interactive)

    def epoch_ended(self) -> bool:
        return self.step == self.epoch_end

    def end_epoch(self) -> None:
        """Close the epoch's progress bar and say how it went."""
        self.close_progress()
        losses = self.epoch_losses
        epoch_loss = self.processes.mean(float(np.mean(losses))) if losses else float("nan")
        self.epoch_losses = []
        if self.processes.is_main:
            print(f"Epoch {self.epoch + 1}/{self.steps.n_epochs}, Loss: {epoch_loss:.4f}, Validation loss: "
                  f"{self.val_loss:.4f} (best {self.best_val:.4f} at step {self.best_step})", flush=True)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # --------------------------------------------------------- evaluate and log

    def evaluation_due(self) -> bool:
        """Every eval_interval steps since the last evaluation, and at every epoch's end."""
        return self.step - self.last_eval_step >= self.plan["eval_interval"] or self.epoch_ended()

    def evaluate_and_log(self, weights_path: str, metrics_path: str) -> None:
        """Validation loss; rank 0 saves the weights when it is the best so far and logs a line."""
        self.last_eval_step = self.step
        # Every process evaluates the same windows, so they stay in step without waiting.
        self.val_loss = estimate_loss(self.model, self.dataset.val, self.steps.batch_size, self.block_size,
                                      self.plan["eval_batches"], self.processes.device, self.autocast)
        train_loss = self.processes.mean(float(np.mean(self.window_losses)))
        self.window_losses = []
        if self.processes.is_main:
            if self.val_loss < self.best_val:
                save_weights(self.model, weights_path)
            with open(metrics_path, "a") as log:
                log.write(json.dumps({
                    "step": self.step, "tokens": self.step * self.steps.tokens_per_step,
                    "train_loss": round(train_loss, 5), "val_loss": round(self.val_loss, 5),
                    "lr": self.lr, "tokens_per_s": round(self.tokens_per_s),
                    "elapsed_s": round(self.elapsed(), 2), "time": round(time.time(), 3)}) + "\n")
        if self.val_loss < self.best_val:
            self.best_val, self.best_step = self.val_loss, self.step
        if self.interactive:
            self.progress.write(f"step {self.step}: validation loss {self.val_loss:.4f}")

    # --------------------------------------------------------------- checkpoint

    def checkpoint_due(self, interval: int, minutes: float) -> bool:
        return self.step % interval == 0 or time.time() - self.last_checkpoint > 60 * minutes

    def save_checkpoint(self, path: str) -> None:
        """Everything --resume needs to continue exactly where this step left off."""
        save_checkpoint(path, self.model, self.optimizer, self.generator, {
            "step": self.step, "best_val": self.best_val, "best_step": self.best_step,
            "last_eval_step": self.last_eval_step, "config": self.model.config, "plan": self.plan,
            "tokenizer_hash": tokenizer_hash(self.dataset.tokenizer), "text_hash": self.dataset.text_hash,
            "elapsed": self.elapsed()})
        self.last_checkpoint = time.time()
