"""The parts train_llm.py's loop is made of: where a run stands (LoopState, one record saved whole
in every checkpoint), its sizes (StepPlan), its one clock, the model's forward and backward over a
batch, evaluation, Ctrl-C, and the log and loss curve. The loop itself, which decides when to
evaluate, save and stop, is train_llm.py's train_loop."""

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from typing import Optional

import numpy as np
import torch

from custom_llm.atomic import atomic_path
from custom_llm.errors import UserError
from custom_llm.files import save_checkpoint as save_checkpoint_file
from custom_llm.memory import training_memory_bytes
from custom_llm.progress import clock
from custom_llm.terminal import say


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch here; use --device cpu", 2)
    return requested


def configure_torch(device_type: str, seed: int, threads: int) -> None:
    """The process-wide torch settings of a training run, made once at start-up."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # oneDNN (bfloat16 products on CPU) may otherwise pick kernels that sum in an order that
        # varies from run to run; a resumed run must end where an uninterrupted one does. No
        # cost measured on Zen 5 (0.82-0.93 s per default-shape step either way).
        torch.backends.mkldnn.deterministic = True


# ------------------------------------------------------------------ the run's state

@dataclasses.dataclass
class LoopState:
    """Where a run stands: everything the loop changes as it goes. Saved whole in every checkpoint
    and restored whole by --resume."""
    step: int = 0
    best_val: float = math.inf
    best_step: Optional[int] = None
    last_eval_step: int = 0
    elapsed: float = 0.0            # training seconds, those of the sessions it resumed included
    total_steps: int = 0            # the plan's total; with a time budget, the latest estimate of what fits
    warmup_steps: int = 0
    micro_batch_size: int = 0       # kept on resume: the split sets the order gradients are summed in

    def saved(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def restored(cls, checkpoint: dict, fresh: "LoopState") -> "LoopState":
        """The checkpoint's state (upgrade_checkpoint first); fresh: this run's own, for what it lacks."""
        saved = {field.name: checkpoint[field.name] for field in dataclasses.fields(cls)}
        return cls(**{name: getattr(fresh, name) if value is None else value for name, value in saved.items()})


def upgrade_checkpoint(checkpoint: dict, dtype: str) -> dict:
    """What checkpoints of earlier versions lack, filled in: the one place that knows their
    defaults. None: not saved, so this run's own value is taken (LoopState.restored)."""
    plan = checkpoint["plan"]
    plan.setdefault("optimizer", "adamw")   # before Muon, runs trained with AdamW
    plan.setdefault("dtype", dtype)
    step = checkpoint["step"]
    checkpoint.setdefault("last_eval_step", step - step % plan["eval_interval"])
    for name in ("total_steps", "warmup_steps", "micro_batch_size"):
        checkpoint.setdefault(name, None)
    return checkpoint


class Clock:
    """The run's one clock: training seconds, this session's and those of the sessions it resumed."""

    def __init__(self, before: float = 0.0):
        self.before, self.started = before, time.monotonic()

    def session(self) -> float:
        return time.monotonic() - self.started

    def elapsed(self) -> float:
        return self.before + self.session()


# ------------------------------------------------------------------ the run's sizes

UNMEASURED = 10 ** 9   # the total steps of a timed run before its step time is known


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The sizes of a step. Each step trains on batch_size windows per process and accumulation
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

    @classmethod
    def of(cls, plan: dict, n_train_tokens: int, sequence_length: int, world_size: int,
           micro_batch_size: int) -> "StepPlan":
        """sequence_length: tokens of one row (architectures.sequence_length)."""
        batch_size, accumulation = plan["batch_size"], plan["grad_accum_steps"]
        micro_batches = world_size * accumulation
        tokens_per_step = batch_size * sequence_length * micro_batches
        return cls(batch_size, accumulation, micro_batches, micro_batch_size, tokens_per_step,
                   max(1, math.ceil(n_train_tokens / tokens_per_step)))

    def planned_steps(self, plan: dict) -> int:
        """The steps of a run of max_epochs (at most max_steps); a timed run's are measured."""
        if plan.get("minutes"):
            return UNMEASURED
        total = plan["max_epochs"] * self.steps_per_epoch
        return min(total, plan["max_steps"]) if plan["max_steps"] else total

    def n_epochs(self, total_steps: int) -> int:
        return math.ceil(total_steps / self.steps_per_epoch)


def micro_batch_for(config: dict, batch_size: int, budget_bytes: float, bfloat16: bool) -> int:
    """The largest share of the batch (a divisor, so every micro-batch has the same size) whose
    training fits the memory budget; 1 when none does."""
    fitting = [d for d in range(1, batch_size + 1)
               if batch_size % d == 0 and training_memory_bytes(config, d, bfloat16) <= budget_bytes]
    return max(fitting, default=1)


def auto_batch_size(precision, sequence_length: int, block_size: int, sparse_targets: bool = False) -> int:
    """Rows per step when the user leaves it to the machine. A short run learns most from many
    steps, so a step should cost little: with fast bfloat16 64 windows cost about what 32 do in
    float32, and each is the best of 16 to 128 measured in a 36-second run of the benchmark model
    (validation loss 1.72 at 64 against 1.84 at 128 with bfloat16 on an AMD EPYC with AVX512-BF16;
    1.80 at 32 against 1.91 at 64 and 2.19 at 128 in float32 limited to AVX2). A step holds that
    many windows' tokens, windows of block_size tokens but at most 128: a model of the same block
    takes the same tokens per step whether its rows are one window (GPT-2's graph) or several (a
    windowed model's), and GPT-2's 1024-token rows take 8 a step, or one step of a pretrained model
    would take many minutes on a CPU. Conversations take 64 windows in
    either precision: only their answers are targets (about one position in ten), and 32 windows
    gave too few of them per step (benchmarks/bench_chat.py, 5 minutes in float32 limited to AVX2:
    64.0% of held-out questions answered exactly at 32 windows, 93.5% at 64)."""
    windows = 64 if precision.autocast or sparse_targets else 32
    return max(1, windows * min(block_size, 128) // sequence_length)


# ------------------------------------------------------------------ forward and backward

def autocast(device_type: str, precision):
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision.autocast)


def forward_backward(train_model, dataset, offsets, steps: StepPlan, processes, autocast) -> float:
    """This process's share of the batch (offsets: the whole batch's windows, drawn alike on every
    process), micro-batch by micro-batch, gradients added up; returns the mean loss. Under
    DistributedDataParallel the gradients are reduced once, with the last micro-batch."""
    loss_value, passes = 0.0, steps.accumulation * (steps.batch_size // steps.micro_batch_size)
    for micro in range(steps.accumulation):
        part = (micro * processes.world_size + processes.rank) * steps.batch_size
        for start in range(part, part + steps.batch_size, steps.micro_batch_size):
            x, y = dataset.batch("train", offsets[start:start + steps.micro_batch_size], processes.device)
            last = micro == steps.accumulation - 1 and start + steps.micro_batch_size == part + steps.batch_size
            with (contextlib.nullcontext() if last or not processes.distributed else train_model.no_sync()):
                with autocast():
                    _, loss = train_model(x, y)
                (loss / passes).backward()
            loss_value += loss.item() / passes
    return loss_value


@torch.no_grad()
def estimate_loss(model, dataset, batch_size, batches, device, autocast):
    """Mean loss over the same windows every time, so evaluations are comparable step to step."""
    model.eval()
    generator = np.random.default_rng(1234)
    losses = []
    for _ in range(batches):
        x, y = dataset.batch("val", dataset.draw("val", generator, batch_size), device)
        with autocast():
            losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


def measure_tokens_per_second(model, dataset, steps: StepPlan, processes, autocast) -> float:
    """One micro-batch's forward and backward, timed before the first step (the second of two; the
    first warms up), so the user knows at once what the plan costs. Torch's random state is left
    as it was."""
    x, y = dataset.batch("train", dataset.draw("train", np.random.default_rng(0), steps.micro_batch_size),
                         processes.device)
    cuda = processes.device_type == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        for _ in range(2):
            started = time.monotonic()
            with autocast():
                _, loss = model(x, y)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.monotonic() - started
    model.zero_grad(set_to_none=True)
    return x.numel() * processes.world_size / seconds


# ------------------------------------------------------------------ Ctrl-C

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
        say("\nStopping after this step and saving a checkpoint (Ctrl-C again to quit at once)...", sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


# ------------------------------------------------------------------ the log and the curve

def read_log(metrics_path) -> list:
    """The metrics log's rows (none when there is no log). A line cut short by a kill mid-write is
    not a row."""
    rows = []
    try:
        with open(metrics_path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return rows


def continue_log(metrics_path, step: int) -> None:
    """A resumed run goes on from its checkpoint's step: the log keeps the rows up to that step.
    Rows written after it (by a run killed before its next checkpoint) are dropped, since the
    resumed run writes them again. A log that is gone starts again from here."""
    rows = [row for row in read_log(metrics_path) if row.get("step", math.inf) <= step]
    with atomic_path(metrics_path) as tmp:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def append_log(metrics_path, row: dict) -> None:
    with open(metrics_path, "a") as log:
        log.write(json.dumps(row) + "\n")


def plot_losses(metrics_path, plot_path) -> bool:
    """Loss curve from the metrics log, drawn without a display; False when the log has no rows."""
    rows = read_log(metrics_path)
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    return True


# ------------------------------------------------------------------ the run, as the loop sees it

@dataclasses.dataclass
class Run:
    """What the loop works with: plain data, built by start.build_run and changed only by the loop."""
    model: torch.nn.Module             # the weights (saved, evaluated)
    train_model: torch.nn.Module       # the same model, compiled and/or under DistributedDataParallel
    optimizer: object
    generator: np.random.Generator     # the batches' draw: the same on every process
    plan: dict
    steps: StepPlan
    state: LoopState
    schedule: object                   # schedule.EvaluationSchedule
    budget: Optional[object]           # schedule.TimeBudget of a timed run
    clock: Clock
    dataset: object
    processes: object
    precision: object
    device_type: str
    compiled: bool
    memory_gb: float
    memory_estimate: int
    first_step: int                    # where this session started
    files: object                      # start.RunFiles: where the weights, checkpoint and log go
    fine_tuning: bool
    checkpoint_interval: int           # steps between checkpoints
    checkpoint_seconds: float          # and seconds

    @property
    def sequence_length(self) -> int:
        """Tokens of one training or validation row."""
        return self.dataset.sequence_length

    def autocast(self):
        return autocast(self.device_type, self.precision)

    def tokens_per_second(self) -> float:
        return (self.state.step - self.first_step) * self.steps.tokens_per_step / max(1e-9, self.clock.session())

    def seconds_left(self) -> float:
        if self.budget:
            return self.budget.left(self.clock.elapsed())
        done_here = self.state.step - self.first_step
        return (self.state.total_steps - self.state.step) * self.clock.session() / max(1, done_here)


def save_checkpoint(run: Run, tokenizer_hash: str) -> None:
    """Everything --resume needs to continue exactly where this step left off: the state record
    whole, the weights, the optimizer, the random draws, and what the run was trained on."""
    run.state.elapsed = run.clock.elapsed()
    save_checkpoint_file(run.files.checkpoint, run.model, run.optimizer, run.generator, {
        **run.state.saved(), "config": run.model.config, "plan": run.plan, "tokenizer_hash": tokenizer_hash,
        "text_hash": run.dataset.text_hash, "manifest": run.dataset.corpus.manifest()})


def summary(run: Run) -> str:
    s, plan, state = run.steps, run.plan, run.state
    length = (f"as many steps as fit in {plan['minutes']:g} min (counted after the first steps)" if run.budget
              else f"{s.n_epochs(state.total_steps)} epoch(s) of {s.steps_per_epoch} steps, "
                   f"{state.total_steps} steps in all")
    split = (f", run {s.micro_batch_size} at a time to fit --memory_gb {run.memory_gb:g}"
             if s.micro_batch_size < s.batch_size else "")
    if run.device_type == "cpu" and run.memory_estimate > run.memory_gb * 2**30:
        split += (f" (even one at a time needs about {run.memory_estimate / 2**30:.1f} GB, more than "
                  f"--memory_gb {run.memory_gb:g}: give --memory_gb N, with N GB free, to run more at once)")
    return (f"Training on {run.device_type} with {run.model.num_parameters() / 1e6:.2f}M parameters: {length}; "
            f"effective batch {s.batch_size * s.micro_batches} {rows_text(run)} ({s.tokens_per_step:,} tokens) = "
            f"{s.batch_size} x {run.processes.world_size} process(es) x {s.accumulation} accumulation step(s)"
            f"{split}; {plan['optimizer']}, peak learning rate {plan['learning_rate']:g}"
            + (", compiled" if run.compiled else "")
            + f"\nPrecision: {run.precision.describe()}"
            + (f"; memory: about {run.memory_estimate / 2**30:.2f} GB" if run.device_type == "cpu" else ""))


def rows_text(run: Run) -> str:
    """What a row of the batch is: a window (the block), or a sequence of several windows."""
    block = run.model.config["block_size"]
    if run.sequence_length == block:
        return "windows"
    return f"sequences of {run.sequence_length} tokens ({run.sequence_length // block} windows of {block})"


def speed_estimate(run: Run) -> str:
    """What the plan costs, from one micro-batch timed before the first step."""
    s = run.steps
    tokens_per_s = measure_tokens_per_second(run.model, run.dataset, s, run.processes, run.autocast)
    if run.budget:
        return (f"Speed: about {tokens_per_s:,.0f} tokens/s (one micro-batch timed), about "
                f"{s.tokens_per_step / tokens_per_s:.1f}s per step; the steps that fit in "
                f"{run.plan['minutes']:g} min are counted after the first ones")
    # A validation batch is a forward pass only, about a third of a training pass.
    steps_left = run.state.total_steps - run.state.step
    n_evaluations = math.ceil(steps_left * run.schedule.evaluations_per_step())
    eval_tokens = n_evaluations * run.plan["eval_batches"] * s.batch_size * run.sequence_length
    seconds = (steps_left * s.tokens_per_step + eval_tokens / 3) / tokens_per_s
    return (f"Speed: about {tokens_per_s:,.0f} tokens/s (one micro-batch timed): the plan of "
            f"{steps_left} steps takes about {clock(seconds)}")
