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

from custom_llm.atomic import atomic_path
from custom_llm.errors import UserError
from custom_llm.data import get_batch, random_offsets
from custom_llm.files import save_checkpoint, save_weights
from custom_llm.memory import training_memory_bytes
from custom_llm.optimizer import make_optimizer
from custom_llm.precision import choose_precision
from custom_llm.progress import Progress, clock
from custom_llm.schedule import TimeBudget, default_warmup, learning_rate_at
from custom_llm.tokenizer import tokenizer_hash


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


def read_log(metrics_path) -> list:
    """The metrics log's rows. A line cut short by a kill mid-write is not a row."""
    rows = []
    with open(metrics_path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def continue_log(metrics_path, step: int) -> None:
    """A resumed run goes on from its checkpoint's step: the log keeps the rows up to that step.
    Rows written after it (by a run killed before its next checkpoint) are dropped, since the
    resumed run writes them again."""
    try:
        rows = read_log(metrics_path)
    except FileNotFoundError:
        return
    with atomic_path(metrics_path) as tmp:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= step)


def plot_losses(metrics_path, plot_path):
    """Loss curve from the metrics log, drawn without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(metrics_path)
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

UNMEASURED = 10 ** 9   # the total steps of a timed run before its step time is known


@dataclass
class StepPlan:
    """How long a run is. Each step trains on batch_size windows per process and accumulation
    step: processes × grad_accum_steps micro-batches drawn together, so the same effective batch
    gives the same training on any number of processes. Each process's batch runs through the
    model micro_batch_size windows at a time (sized to the memory budget), with the gradients
    added up: the same step as one pass over the batch, to float rounding."""
    batch_size: int
    accumulation: int
    micro_batches: int
    micro_batch_size: int
    tokens_per_step: int
    steps_per_epoch: int
    total_steps: int          # with a time budget: the latest estimate of what fits
    warmup_steps: int

    @classmethod
    def of(cls, plan: dict, n_train_tokens: int, block_size: int, world_size: int,
           micro_batch_size: int) -> "StepPlan":
        batch_size, accumulation = plan["batch_size"], plan["grad_accum_steps"]
        micro_batches = world_size * accumulation
        tokens_per_step = batch_size * block_size * micro_batches
        steps_per_epoch = max(1, math.ceil(n_train_tokens / tokens_per_step))
        if plan.get("minutes"):
            total_steps = UNMEASURED   # set once the first steps are timed
        else:
            total_steps = plan["max_epochs"] * steps_per_epoch
            if plan["max_steps"]:
                total_steps = min(total_steps, plan["max_steps"])
        warmup_steps = plan["warmup_steps"] if plan["warmup_steps"] is not None else \
            default_warmup(total_steps, fine_tuning=bool(plan.get("init_from")))
        return cls(batch_size, accumulation, micro_batches, micro_batch_size, tokens_per_step, steps_per_epoch,
                   total_steps, warmup_steps)

    @property
    def n_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def micro_batch_for(config: dict, batch_size: int, budget_bytes: float, bfloat16: bool) -> int:
    """The largest share of the batch (a divisor, so every micro-batch has the same size) whose
    training fits the memory budget; 1 when none does."""
    fitting = [d for d in range(1, batch_size + 1)
               if batch_size % d == 0 and training_memory_bytes(config, d, bfloat16) <= budget_bytes]
    return max(fitting, default=1)


def auto_batch_size(precision, block_size: int) -> int:
    """Windows per step when the user leaves it to the machine. A short run learns most from many
    steps, so a step should cost little: with fast bfloat16 64 windows cost about what 32 do in
    float32, and each is the best of 16 to 128 measured in a 36-second run of the benchmark model
    (validation loss 1.72 at 64 against 1.84 at 128 with bfloat16 on an AMD EPYC with AVX512-BF16;
    1.80 at 32 against 1.91 at 64 and 2.19 at 128 in float32 limited to AVX2). Those were windows
    of 128 tokens: longer windows (GPT-2's 1024) take fewer, for the same tokens per step, or one
    step of a pretrained model would take many minutes on a CPU."""
    windows = 64 if precision.autocast else 32
    return max(1, min(windows, windows * 128 // block_size))


class TrainingRun:
    """A training run: the model (and its compiled or distributed wrapper), the optimizer, the
    random draws, the step plan, and where the run stands. Its methods are the loop's steps."""

    def __init__(self, model, plan, dataset, processes, compile_mode: str, memory_gb: float, checkpoint=None):
        self.model, self.plan, self.dataset, self.processes = model, plan, dataset, processes
        self.block_size = model.config["block_size"]
        self.device_type = "cuda" if processes.device.startswith("cuda") else "cpu"
        # Rank 0 decides, so that every process trains in the same precision.
        self.precision = processes.share(choose_precision(plan["dtype"], self.device_type)
                                         if processes.is_main else None)
        self.optimizer = make_optimizer(model, plan["learning_rate"], plan["weight_decay"], self.device_type,
                                        plan["optimizer"], self.precision.dtype)
        if plan["batch_size"] == "auto":
            plan["batch_size"] = auto_batch_size(self.precision, self.block_size)
        self.generator = np.random.default_rng(plan["seed"])  # the same on every process: they share the draw
        # On a GPU the batch runs whole; on a CPU it is split to fit the memory budget. A resumed
        # run keeps its first split: the split sets the order in which gradients are summed, and
        # the memory in use at start-up (which sizes it) is not the same after loading a checkpoint.
        if checkpoint and checkpoint.get("micro_batch_size"):
            micro = checkpoint["micro_batch_size"]
        elif self.device_type == "cuda":
            micro = plan["batch_size"]
        else:
            micro = micro_batch_for(model.config, plan["batch_size"], memory_gb * 2**30, self.precision.autocast)
        self.memory_gb, self.memory_estimate = memory_gb, training_memory_bytes(model.config, micro,
                                                                                 self.precision.autocast)
        self.steps = StepPlan.of(plan, len(dataset.train), self.block_size, processes.world_size, micro)
        self.budget = TimeBudget(plan["minutes"]) if plan.get("minutes") else None
        self.step, self.best_val, self.best_step, self.last_eval_step = 0, float("inf"), None, 0
        self.elapsed_before, self.val_loss = 0.0, float("nan")
        if checkpoint:
            self.restore(checkpoint)
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            # oneDNN (bfloat16 products on CPU) may otherwise pick kernels that sum in an order that
            # varies from run to run; a resumed run must end where an uninterrupted one does. No
            # cost measured on Zen 5 (0.82-0.93 s per default-shape step either way).
            torch.backends.mkldnn.deterministic = True
        self.compiled = compile_mode == "yes" or (compile_mode == "auto" and self.device_type == "cuda")
        self.train_model = torch.compile(model) if self.compiled else model
        if processes.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[processes.local_rank] if self.device_type == "cuda" else None)
        self.progress = Progress(None if self.budget else self.steps.total_steps, self.step,
                                 interactive=sys.stderr.isatty(), enabled=processes.is_main)
        self.lr = self.tokens_per_s = 0.0   # of the latest step
        self.window_losses, self.epoch_losses = [], []
        self.tokens_at_start = self.step * self.steps.tokens_per_step
        self.started = self.last_checkpoint = time.time()
        if self.budget:
            self.budget.elapsed_before = self.elapsed_before
            self.budget.start()

    def restore(self, checkpoint) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.processes.is_main:
            torch.set_rng_state(checkpoint["torch_rng"])
        self.generator.bit_generator.state = checkpoint["numpy_rng"]
        self.step, self.best_val, self.best_step = checkpoint["step"], checkpoint["best_val"], checkpoint["best_step"]
        self.last_eval_step = checkpoint.get("last_eval_step", self.step - self.step % self.plan["eval_interval"])
        self.elapsed_before = checkpoint["elapsed"]
        if self.budget and "total_steps" in checkpoint:  # a timed run goes on with its last estimate
            self.steps.total_steps, self.steps.warmup_steps = checkpoint["total_steps"], checkpoint["warmup_steps"]

    def summary(self) -> str:
        s, plan = self.steps, self.plan
        length = (f"as many steps as fit in {plan['minutes']:g} min (counted after the first steps)"
                  if self.budget else f"{s.n_epochs} epoch(s) of {s.steps_per_epoch} steps, {s.total_steps} steps in all")
        split = (f", run {s.micro_batch_size} at a time to fit --memory_gb {self.memory_gb:g}"
                 if s.micro_batch_size < s.batch_size else "")
        if self.device_type == "cpu" and self.memory_estimate > self.memory_gb * 2**30:
            split += (f" (even one at a time needs about {self.memory_estimate / 2**30:.1f} GB, more than "
                      f"--memory_gb {self.memory_gb:g}: give --memory_gb N, with N GB free, to run more at once)")
        return (f"Training on {self.device_type} with {self.model.num_parameters() / 1e6:.2f}M parameters: {length}; "
                f"effective batch {s.batch_size * s.micro_batches} windows ({s.tokens_per_step:,} tokens) = "
                f"{s.batch_size} x {self.processes.world_size} process(es) x {s.accumulation} accumulation step(s)"
                f"{split}; {plan['optimizer']}, peak learning rate {plan['learning_rate']:g}"
                + (", compiled" if self.compiled else "")
                + f"\nPrecision: {self.precision.describe()}"
                + (f"; memory: about {self.memory_estimate / 2**30:.2f} GB" if self.device_type == "cpu" else ""))

    def speed_estimate(self) -> str:
        """Before the first step: one micro-batch's forward and backward is timed (the second of
        two; the first warms up), so the user knows at once what the plan costs. A pretrained
        model of 124M parameters trains slowly on a CPU. Torch's random state is left as it was."""
        s = self.steps
        offsets = random_offsets(np.random.default_rng(0), len(self.dataset.train), self.block_size,
                                 s.micro_batch_size)
        x, y = get_batch(self.dataset.train, offsets, self.block_size, self.processes.device)
        cuda = self.device_type == "cuda"
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            for _ in range(2):
                started = time.time()
                with self.autocast():
                    _, loss = self.model(x, y)
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.time() - started
        self.model.zero_grad(set_to_none=True)
        tokens_per_s = s.micro_batch_size * self.block_size * self.processes.world_size / seconds
        if self.budget:
            return (f"Speed: about {tokens_per_s:,.0f} tokens/s (one micro-batch timed), about "
                    f"{s.tokens_per_step / tokens_per_s:.1f}s per step; the steps that fit in "
                    f"{self.plan['minutes']:g} min are counted after the first ones")
        # Validations: every eval_interval steps and at each epoch's end; a validation batch is a
        # forward pass only, about a third of a training pass.
        steps_left = s.total_steps - self.step
        n_evaluations = steps_left // self.plan["eval_interval"] + math.ceil(steps_left / s.steps_per_epoch)
        eval_tokens = n_evaluations * self.plan["eval_batches"] * s.batch_size * self.block_size
        seconds = (steps_left * s.tokens_per_step + eval_tokens / 3) / tokens_per_s
        return (f"Speed: about {tokens_per_s:,.0f} tokens/s (one micro-batch timed): the plan of "
                f"{steps_left} steps takes about {clock(seconds)}")

    @property
    def done(self) -> bool:
        return self.step >= self.steps.total_steps

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.precision.autocast)

    def elapsed(self) -> float:
        """Training seconds, this process and the runs it resumed together."""
        return self.elapsed_before + time.time() - self.started

    def seconds_left(self) -> float:
        if self.budget:
            return self.budget.left()
        done_here = self.step - self.tokens_at_start // self.steps.tokens_per_step
        return (self.steps.total_steps - self.step) * (time.time() - self.started) / max(1, done_here)

    # ------------------------------------------------------------------- a step

    def train_step(self) -> None:
        """One optimizer step on a fresh draw of windows, at the schedule's learning rate."""
        s = self.steps
        started = time.time()
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
        if self.budget:
            self.budget.record_step(time.time() - started)
            self._fit_plan_to_budget()
        self.tokens_per_s = (self.step * s.tokens_per_step - self.tokens_at_start) / (time.time() - self.started)
        self.progress.update(self.step, s.total_steps, loss_value, self.tokens_per_s, self.seconds_left())

    def _accumulate_gradients(self) -> float:
        """Forward and backward over this process's share of the batch, micro-batch by
        micro-batch; returns the mean loss."""
        s, processes = self.steps, self.processes
        offsets = random_offsets(self.generator, len(self.dataset.train), self.block_size,
                                 s.batch_size * s.micro_batches)
        loss_value, passes = 0.0, s.accumulation * (s.batch_size // s.micro_batch_size)
        for micro in range(s.accumulation):
            part = (micro * processes.world_size + processes.rank) * s.batch_size
            for start in range(part, part + s.batch_size, s.micro_batch_size):
                x, y = get_batch(self.dataset.train, offsets[start:start + s.micro_batch_size], self.block_size,
                                 processes.device)
                last = micro == s.accumulation - 1 and start + s.micro_batch_size == part + s.batch_size
                with (contextlib.nullcontext() if last or not processes.distributed else self.train_model.no_sync()):
                    with self.autocast():
                        _, loss = self.train_model(x, y)
                    (loss / passes).backward()
                loss_value += loss.item() / passes
        return loss_value

    def _fit_plan_to_budget(self) -> None:
        """A timed run: the total is what fits in the time left, re-estimated at every step; the
        warmup is fixed at the first estimate (5% of it, at most 200, unless --warmup_steps)."""
        if not self.budget.measured:
            return
        first = self.steps.total_steps == UNMEASURED
        self.steps.total_steps = max(self.step, self.budget.total_steps(
            self.step, self.plan["eval_interval"], self.plan["eval_batches"]))
        if first and self.plan["warmup_steps"] is None:
            self.steps.warmup_steps = default_warmup(self.steps.total_steps,
                                                     fine_tuning=bool(self.plan.get("init_from")))
        if first and self.processes.is_main:
            self.progress.write(f"About {self.steps.total_steps} steps fit in {self.plan['minutes']:g} min "
                                f"({self.budget.mean_step_seconds():.2f}s per step); the schedule is laid over them")

    # ------------------------------------------------------------------- epochs

    @property
    def epoch(self) -> int:
        return (self.step - 1) // self.steps.steps_per_epoch

    def epoch_ended(self) -> bool:
        return self.step % self.steps.steps_per_epoch == 0 or self.done

    def end_epoch(self) -> None:
        """Say how the epoch went."""
        losses = self.epoch_losses
        epoch_loss = self.processes.mean(float(np.mean(losses))) if losses else float("nan")
        self.epoch_losses = []
        self.progress.write(f"Epoch {self.epoch + 1}/{self.steps.n_epochs}, Loss: {epoch_loss:.4f}, Validation loss: "
                            f"{self.val_loss:.4f} (best {self.best_val:.4f} at step {self.best_step})", sys.stdout)

    def close_progress(self) -> None:
        self.progress.close()

    # --------------------------------------------------------- evaluate and log

    def evaluation_due(self) -> bool:
        """Every eval_interval steps since the last evaluation, and at every epoch's end."""
        return self.step - self.last_eval_step >= self.plan["eval_interval"] or self.epoch_ended()

    def evaluate_and_log(self, weights_path: str, metrics_path: str) -> None:
        """Validation loss; rank 0 saves the weights when it is the best so far and logs a line."""
        started = time.time()
        self.last_eval_step = self.step
        # Every process evaluates the same windows, so they stay in step without waiting.
        self.val_loss = estimate_loss(self.model, self.dataset.val, self.steps.micro_batch_size, self.block_size,
                                      self.plan["eval_batches"] * self.steps.batch_size // self.steps.micro_batch_size,
                                      self.processes.device, self.autocast)
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
        self.progress.write(f"step {self.step}: validation loss {self.val_loss:.4f}")
        if self.budget:  # the next step's estimate counts it
            self.budget.record_evaluation(time.time() - started)

    # --------------------------------------------------------------- checkpoint

    def checkpoint_due(self, interval: int, minutes: float) -> bool:
        return self.step % interval == 0 or time.time() - self.last_checkpoint > 60 * minutes

    def save_checkpoint(self, path: str) -> None:
        """Everything --resume needs to continue exactly where this step left off."""
        save_checkpoint(path, self.model, self.optimizer, self.generator, {
            "step": self.step, "best_val": self.best_val, "best_step": self.best_step,
            "last_eval_step": self.last_eval_step, "config": self.model.config, "plan": self.plan,
            "tokenizer_hash": tokenizer_hash(self.dataset.tokenizer), "text_hash": self.dataset.text_hash,
            "manifest": self.dataset.corpus.manifest(),
            "elapsed": self.elapsed(), "total_steps": self.steps.total_steps,
            "warmup_steps": self.steps.warmup_steps, "micro_batch_size": self.steps.micro_batch_size})
        self.last_checkpoint = time.time()
