"""How a training run begins, decided once: where it starts (Start), which files it writes
(RunFiles), what it reads and checks before writing anything (Setup), its data, its starting
weights, and the Run the loop works with. train_llm.py calls these in order; nothing after them
asks again how the run began.

    from scratch       a new model of model_config.pth's shape, a tokenizer made from the data
    resume             the checkpoint's run, exactly where it stopped (--resume)
    trained weights    fine-tune trained_model.pth, with its tokenizer (--init_from FILE)
    gpt2 folder        fine-tune a local Hugging Face GPT-2 folder, with its tokenizer (--init_from DIR)
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from custom_llm import data, gpt2, terminal
from custom_llm.atomic import atomic_path, check_writable, remove_stale_temporaries
from custom_llm.cli import ask
from custom_llm.corpus import absolute_spec, find_documents
from custom_llm.default_text import build_default_text
from custom_llm.files import (check_resume, check_tokenizer_fits, load_checkpoint, load_config, load_trained_model,
                              save_config)
from custom_llm.gpt2_folder import load_gpt2_model, read_gpt2_folder
from custom_llm.memory import training_memory_bytes
from custom_llm.model import build_model, grow_vocabulary
from custom_llm.optimizer import make_optimizer
from custom_llm.schedule import RECIPES, EvaluationSchedule, TimeBudget, default_warmup
from custom_llm.tokenizer import load_tokenizer, save_tokenizer
from custom_llm.training import Clock, LoopState, Run, StepPlan, continue_log, micro_batch_for, upgrade_checkpoint

SCRATCH, RESUME, WEIGHTS, GPT2_FOLDER = "from scratch", "resume", "trained weights", "gpt2 folder"
DEFAULT_TEXT = "input.txt"
FINE_TUNING_DROPOUT = 0.1   # GPT-2's own; nanoGPT's advice for fine-tuning is 0.1 or more
# Flags that shape the run's result: kept in the checkpoint, so --resume follows the same plan.
PLAN_FLAGS = ("minutes", "max_steps", "seed", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
              "eval_interval", "eval_batches", "grad_accum_steps", "optimizer", "dtype", "init_from")


@dataclass(frozen=True)
class Start:
    """Where the run starts: one of SCRATCH, RESUME, WEIGHTS, GPT2_FOLDER, and from what."""
    kind: str
    source: Optional[str] = None        # the checkpoint, trained weights or GPT-2 folder
    resumed_from: Optional[str] = None  # on RESUME: the run's own --init_from, if it had one

    @property
    def fine_tuning(self) -> bool:
        """It trains weights that were trained before (its own, or a resumed fine-tuning run's)."""
        return self.kind in (WEIGHTS, GPT2_FOLDER) or bool(self.resumed_from)

    @property
    def recipe(self) -> str:
        """Which of schedule.RECIPES a new run's defaults come from."""
        return {GPT2_FOLDER: "gpt2", WEIGHTS: "trained weights"}.get(self.kind, "from scratch")


def decide_start(args, checkpoint: Optional[dict]) -> Start:
    """The starting point, from the flags and the checkpoint (read when --resume)."""
    if args.resume:
        return Start(RESUME, args.checkpoint_path, resumed_from=checkpoint["plan"].get("init_from"))
    if args.init_from:
        return Start(GPT2_FOLDER if os.path.isdir(args.init_from) else WEIGHTS, args.init_from)
    return Start(SCRATCH)


# Where a run's log and loss curve go: a fine-tuning run keeps the first run's.
LOG_PATHS = {False: ("training_log.jsonl", "loss_curve.png"), True: ("finetune_log.jsonl", "finetune_loss_curve.png")}


@dataclass(frozen=True)
class RunFiles:
    """Every file the run reads or writes, as the flags and the start decide them."""
    config: str
    tokenizer: str
    output: str          # the best weights
    checkpoint: str
    manifest: str
    metrics: str         # one JSON line per evaluation
    plot: str

    @classmethod
    def of(cls, args, start: Start) -> "RunFiles":
        metrics, plot = LOG_PATHS[start.fine_tuning]
        return cls(args.config_path, args.tokenizer_path, args.output, args.checkpoint_path, args.manifest_path,
                   args.metrics_path or metrics, args.plot_path or plot)

    def written(self) -> list:
        return [self.output, self.checkpoint, self.tokenizer, self.metrics, self.plot, self.config, self.manifest]


# ------------------------------------------------------------------ reading and checking

@dataclass
class Setup:
    """What rank 0 read and checked before anything is written; shared with the other processes."""
    start: Start
    files: RunFiles
    config: dict                    # completed by complete_config once the data is read
    tokenizer: object               # the one the run keeps (resume, fine-tuning), or None: made from the data
    plan: dict
    checkpoint: Optional[dict]
    starting_vocab_size: int        # of the weights it starts from


def read_setup(args, questions: Callable[[str], list]) -> Setup:
    """Rank 0: the start, the checkpoint (--resume), the config and tokenizer, and the plan (the
    checkpoint's, or the answers to questions(recipe) and the plan flags)."""
    checkpoint = upgrade_checkpoint(load_checkpoint(args.checkpoint_path), args.dtype) if args.resume else None
    start = decide_start(args, checkpoint)
    files = RunFiles.of(args, start)
    config, tokenizer = config_and_tokenizer(start, files)
    for path in files.written():
        check_writable(path)
        remove_stale_temporaries(path)  # left by a run that was killed while writing
    if checkpoint:
        plan = checkpoint["plan"]
        terminal.say(f"Resuming from {files.checkpoint} at step {checkpoint['step']}")
    else:
        plan = ask_plan(args, start, questions)
    if plan["dataset_path"] == DEFAULT_TEXT and not os.path.exists(DEFAULT_TEXT):
        n_chars = build_default_text(DEFAULT_TEXT)
        terminal.say(f"No {DEFAULT_TEXT} here, so one was made for you: {n_chars:,} characters of Python's "
                     "own documentation. Give --dataset_path to train on your text.")
    return Setup(start, files, config, tokenizer, plan, checkpoint, config["vocab_size"])


def config_and_tokenizer(start: Start, files: RunFiles):
    """The model config, and the tokenizer the run keeps (None: one is made from the data). From a
    GPT-2 folder both are its own, over whatever else model_config.pth holds; from trained weights
    (and on --resume) they are the first run's. A new BPE keeps the size asked for."""
    if start.kind == GPT2_FOLDER:
        config = load_config(files.config) if os.path.exists(files.config) else {}
        gpt2_config, tokenizer = read_gpt2_folder(start.source)
        config.update(gpt2_config, architecture=gpt2.NAME, dropout=FINE_TUNING_DROPOUT, tokenizer="bpe")
        config.pop("train_windows", None)          # GPT-2 trains on rows of one block
        config.pop("vocab_size_requested", None)   # the size asked of a BPE trained here: none is
        return config, tokenizer
    config = load_config(files.config)
    if start.kind == SCRATCH:
        if config.get("tokenizer") == "bpe":   # the size a new BPE is asked for: llm_model.py's, kept
            config.setdefault("vocab_size_requested", config["vocab_size"])
        return config, None
    return config, load_tokenizer(files.tokenizer)


def ask_plan(args, start: Start, questions: Callable[[str], list]) -> dict:
    """A new run's plan: the questions (a timed run's length is its time: the number of epochs is
    not asked), then the plan flags."""
    plan = ask("Configure training parameters:",
               [q for q in questions(start.recipe) if not (args.minutes and q.name == "max_epochs")], args)
    plan.setdefault("max_epochs", None)
    plan.update({name: getattr(args, name) for name in PLAN_FLAGS})
    plan["optimizer"] = args.optimizer or RECIPES[start.recipe]["optimizer"]
    return plan


def load_dataset(setup: Setup, encoding: str, processes, say) -> data.Dataset:
    """The data, of whatever kind (data.py), tokenized with the run's tokenizer or a new one. Rank
    0 prepares it first and fills the cache; the other processes then read it from there."""
    with processes.main_first():
        corpus = find_documents(setup.plan["dataset_path"], encoding)   # once per run: every later step uses it
        dataset = data.prepare(corpus, setup.tokenizer, setup.config)
    dataset.check_fits()
    for line in dataset.report():   # the tokenizer made, what was read, where the cache is, what was skipped
        say(line)
    return dataset


def complete_config(setup: Setup, dataset: data.Dataset, encoding: str) -> bool:
    """The tokenizer and the config must belong together: checked on --resume and on trained
    weights. The config takes the real vocab_size, the data's path and encoding (convert_to_gguf.py
    checks the model on its held-out part) and what the data adds (a chat model's template). True
    when the tokenizer is new (made here, a GPT-2 folder's, or grown by the chat's tokens) and is
    to be saved."""
    config, tokenizer = setup.config, dataset.tokenizer
    if setup.start.kind == RESUME:
        check_resume(setup.checkpoint, config, tokenizer, dataset)
        return False
    if setup.start.kind == WEIGHTS:
        check_tokenizer_fits(setup.tokenizer, dict(config, vocab_size=setup.starting_vocab_size),
                             setup.files.tokenizer, setup.files.config)
    config.update(dataset.saved_with_model, vocab_size=tokenizer.get_vocab_size(),
                  dataset_path=absolute_spec(setup.plan["dataset_path"]), dataset_encoding=encoding)
    return setup.start.kind != WEIGHTS or tokenizer is not setup.tokenizer


def load_starting_model(setup: Setup):
    """A new model, or the weights to fine-tune: a GPT-2 folder's, or trained_model.pth's, grown
    by rows for tokens their tokenizer gained here (the chat's)."""
    config = setup.config
    if setup.start.kind not in (WEIGHTS, GPT2_FOLDER):
        return build_model(config)
    weights_config = dict(config, vocab_size=setup.starting_vocab_size)
    if setup.start.kind == GPT2_FOLDER:
        model = load_gpt2_model(setup.start.source, weights_config)
    else:
        model = load_trained_model(setup.start.source, weights_config)
    model = grow_vocabulary(model, config["vocab_size"]).train()
    model.config.update(config)
    return model


# ------------------------------------------------------------------ writing, and the run's start

def write_run_files(setup: Setup, dataset: data.Dataset, new_tokenizer: bool) -> None:
    """Rank 0, once every input is checked: the tokenizer and config of a new run, the manifest of
    the files it trains on (resumed runs included), and the log: a resumed run's continues, a new
    run's starts anew."""
    files, config = setup.files, setup.config
    if not setup.checkpoint:
        if new_tokenizer:
            save_tokenizer(dataset.tokenizer, files.tokenizer)
        save_config(config, files.config)
        if new_tokenizer:
            terminal.say(f"Tokenizer: vocabulary of {config['vocab_size']} "
                         + ("(byte-level BPE" if config.get("tokenizer") == "bpe"
                            else "(one token per character, plus byte fallback")
                         + (f" of {setup.start.source}" if setup.start.fine_tuning else "")
                         + f") saved to {files.tokenizer}")
    with atomic_path(files.manifest) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dataset.corpus.manifest(), f, indent=1)
    if setup.checkpoint:
        continue_log(files.metrics, setup.checkpoint["step"])
    elif os.path.exists(files.metrics):
        os.remove(files.metrics)


def build_run(setup: Setup, args, model, dataset, processes, precision) -> Run:
    """The optimizer, the batch split, the state (new, or the checkpoint's), and the model as it
    trains: compiled on CUDA, under DistributedDataParallel with several processes."""
    plan, device_type, checkpoint = setup.plan, processes.device_type, setup.checkpoint
    optimizer = make_optimizer(model, plan["learning_rate"], plan["weight_decay"], device_type, plan["optimizer"],
                               precision.dtype)
    generator = np.random.default_rng(plan["seed"])  # the same on every process: they share the draw
    # On a GPU the batch runs whole; on a CPU it is split to fit the memory budget.
    micro_batch_size = (plan["batch_size"] if device_type == "cuda" else
                        micro_batch_for(model.config, plan["batch_size"], args.memory_gb * 2**30, precision.autocast))
    fresh = StepPlan.of(plan, dataset.n_train_tokens, dataset.sequence_length, processes.world_size,
                        micro_batch_size)
    total_steps = fresh.planned_steps(plan)
    state = LoopState(total_steps=total_steps, micro_batch_size=micro_batch_size,
                      warmup_steps=plan["warmup_steps"] if plan["warmup_steps"] is not None else
                      default_warmup(total_steps, fine_tuning=setup.start.fine_tuning))
    if checkpoint:
        state = LoopState.restored(checkpoint, fresh=state)
        restore(checkpoint, model, optimizer, generator, processes.is_main)
    steps = dataclasses.replace(fresh, micro_batch_size=state.micro_batch_size)
    compiled = args.compile == "yes" or (args.compile == "auto" and device_type == "cuda")
    train_model = torch.compile(model) if compiled else model
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(train_model,
                                              device_ids=[processes.local_rank] if device_type == "cuda" else None)
    return Run(model=model, train_model=train_model, optimizer=optimizer, generator=generator, plan=plan,
               steps=steps, state=state, schedule=EvaluationSchedule(plan["eval_interval"], steps.steps_per_epoch),
               budget=TimeBudget(plan["minutes"]) if plan.get("minutes") else None, clock=Clock(state.elapsed),
               dataset=dataset, processes=processes, precision=precision, device_type=device_type,
               compiled=compiled, memory_gb=args.memory_gb,
               memory_estimate=training_memory_bytes(model.config, steps.micro_batch_size, precision.autocast),
               first_step=state.step, files=setup.files, fine_tuning=setup.start.fine_tuning,
               checkpoint_interval=args.checkpoint_interval, checkpoint_seconds=60 * args.checkpoint_minutes)


def restore(checkpoint: dict, model, optimizer, generator, is_main: bool) -> None:
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if is_main:
        torch.set_rng_state(checkpoint["torch_rng"])
    generator.bit_generator.state = checkpoint["numpy_rng"]
