"""Stage 2: build a tokenizer from your text and train the GPT on it.

    python train_llm.py                                   # answer the questions
    python train_llm.py --dataset_path my.txt --max_steps 200 -y
    python train_llm.py --dataset_path notes/ extra.txt 'posts/*.md' -y   # documents: folders, files, globs
    python train_llm.py --resume                          # continue an interrupted run
    python train_llm.py --init_from trained_model.pth --dataset_path more.txt   # train further
    python train_llm.py --init_from gpt2 --dataset_path my.txt   # fine-tune a local GPT-2 folder

Reads model_config.pth (from llm_model.py), writes tokenizer.json, updates the config's
vocab_size, and saves trained_model.pth: the weights from the evaluation with the best validation
loss. A resumable checkpoint is saved every few hundred steps, every few minutes and on Ctrl-C.
--init_from a Hugging Face GPT-2 folder writes model_config.pth and tokenizer.json from it instead.
Starting from trained weights (either kind) fine-tunes, at a smaller learning rate, and the log
and loss curve go to finetune_log.jsonl and finetune_loss_curve.png, beside the first run's.
"""

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch

from custom_llm import terminal
from custom_llm.atomic import atomic_path, check_writable, remove_stale_temporaries
from custom_llm.cli import ArgumentParser, Question, add_question_flags, ask, run
from custom_llm.conversations import is_chat_corpus, prepare_conversations
from custom_llm.corpus import absolute_spec, find_documents, parse_dataset_answer, spec_text
from custom_llm.data import PackedConversations, check_split, prepare_dataset, random_offsets
from custom_llm.default_text import build_default_text
from custom_llm.distributed import Processes
from custom_llm.errors import UserError
from custom_llm.files import (check_resume, check_tokenizer_fits, load_checkpoint, load_config, load_trained_model,
                              save_config, save_weights)
from custom_llm.flags import NUMBERS
from custom_llm.gpt2 import check_starting_point, load_gpt2_model, read_gpt2_folder
from custom_llm.memory import check_memory, training_memory_bytes
from custom_llm.model import GPTLanguageModel, grow_vocabulary
from custom_llm.optimizer import make_optimizer
from custom_llm.precision import choose_precision
from custom_llm.progress import Progress
from custom_llm.resources import peak_rss_bytes
from custom_llm.schedule import RECIPES, EvaluationSchedule, TimeBudget, default_warmup, learning_rate_at
from custom_llm.tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash
from custom_llm.tokens_cache import bpe_tokenizer_for
from custom_llm.training import (UNMEASURED, Clock, LoopState, Run, StepPlan, StopRequest, append_log,
                                 auto_batch_size, configure_torch, continue_log, estimate_loss, forward_backward,
                                 micro_batch_for, pick_device, plot_losses, restore, save_checkpoint, speed_estimate,
                                 summary, upgrade_checkpoint)

DEFAULT_TEXT = "input.txt"
FINE_TUNING_DROPOUT = 0.1   # GPT-2's own; nanoGPT's advice for fine-tuning is 0.1 or more
# Where a run's log and loss curve go: a fine-tuning run keeps the first run's.
LOG_PATHS = {False: ("training_log.jsonl", "loss_curve.png"), True: ("finetune_log.jsonl", "finetune_loss_curve.png")}


def questions(recipe: str):
    fine_tuning = recipe != "from scratch"
    return [
        Question("batch_size", "Batch size in windows (auto: 64 where bfloat16 is fast or for conversations, "
                 "else 32; fewer for windows over 128 tokens)", "auto",
                 lambda text: "auto" if text.strip().lower() == "auto" else NUMBERS["batch_size"].parse(text)),
        Question("learning_rate", "Learning rate" + (" (fine-tuning)" if fine_tuning else ""),
                 RECIPES[recipe]["learning_rate"]),
        Question("max_epochs", "Number of epochs", 5),
        Question("dataset_path", "Your text: a file, a folder, or several paths and globs separated by spaces",
                 DEFAULT_TEXT, parse_dataset_answer, several=True),
    ]


# Flags that shape the run's result: kept in the checkpoint, so --resume follows the same plan.
PLAN_FLAGS = ("minutes", "max_steps", "seed", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
              "eval_interval", "eval_batches", "grad_accum_steps", "optimizer", "dtype", "init_from")


def parse_args():
    parser = ArgumentParser(description="Train your GPT on a text file or a folder of documents.")
    add_question_flags(parser, questions("from scratch"))
    parser.add_number("minutes", shown_default="off: train for --max_epochs")
    parser.add_number("max_steps")
    parser.add_number("seed", 1337)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--config_path", default="model_config.pth")
    parser.add_argument("--output", default="trained_model.pth", help="where to save the best weights")
    parser.add_argument("--tokenizer_path", default="tokenizer.json")
    parser.add_argument("--encoding", default="utf-8", help="the text's encoding (files in another are skipped)")
    parser.add_number("eval_interval", 250)
    parser.add_number("eval_batches", 10)
    parser.add_number("warmup_steps", shown_default="5% of the steps, at most 200")
    parser.add_number("min_lr_ratio", 0.1)
    parser.add_number("weight_decay", 0.1)
    parser.add_number("grad_clip", 1.0)
    parser.add_number("grad_accum_steps", 1)
    parser.add_number("memory_gb", 1.5)
    parser.add_argument("--optimizer", choices=["muon", "adamw"], default=None,
                        help="muon: Muon for the blocks' matrices, AdamW for the rest (the default, but for "
                             "fine-tuning a GPT-2 folder); adamw: AdamW only")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="autocast type; auto: bfloat16 where it is fast here (a CUDA GPU that supports it, or a "
                        "CPU where a 0.1 s probe measures bfloat16 products at least 1.3x float32), else float32")
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                        help="torch.compile; auto: on CUDA only")
    parser.add_argument("--checkpoint_path", default="checkpoint.pth", help="resumable training state")
    parser.add_number("checkpoint_interval", 500)
    parser.add_number("checkpoint_minutes", 5.0)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint_path")
    parser.add_argument("--init_from", default=None,
                        help="fine-tune: start from trained weights (trained_model.pth, with tokenizer.json) or "
                             "a local Hugging Face GPT-2 folder (e.g. gpt2, distilgpt2), on a new text")
    parser.add_argument("--metrics_path", default=None,
                        help="one JSON line per evaluation (default: training_log.jsonl; finetune_log.jsonl "
                             "with --init_from)")
    parser.add_argument("--plot_path", default=None,
                        help="loss curve written at the end (default: loss_curve.png; finetune_loss_curve.png "
                             "with --init_from)")
    parser.add_argument("--manifest_path", default="dataset_manifest.json",
                        help="the files trained on: path, size, content hash, held out or skipped")
    args = parser.parse_args()
    if args.minutes and args.max_steps:
        raise UserError("--minutes and --max_steps exclude each other: give the run's length as a time "
                        "or as a number of steps", 2)
    if args.resume and args.init_from:
        raise UserError("--resume and --init_from exclude each other: resume continues a run, "
                        "init_from starts a new one from trained weights", 2)
    if args.init_from:
        check_starting_point(args.init_from)
    return args


def main():
    args = parse_args()
    processes = Processes(pick_device(args.device))
    try:
        train(args, processes)
        # Ranks leave together: one that tears down while rank 0 still saves and plots could abort
        # in gloo ("terminate called without an active exception", one run in three here).
        processes.barrier()
    except RuntimeError as err:   # torch.distributed's errors: a process it waited for is gone
        if not processes.distributed:
            raise
        raise UserError("another training process stopped, so this one stops too "
                        f"({str(err).strip().splitlines()[0][:200]})") from None
    finally:
        processes.close()


def train(args, processes):
    """Read and check every input, then write; train; report. Only rank 0 asks, reads the run's
    files, talks and writes; the other processes get what it read and need only the text."""
    say = terminal.say if processes.is_main else (lambda *a, **k: None)

    # Read and check everything before writing anything: a failure leaves every file as it was.
    checkpoint, config, tokenizer, plan = processes.share_from_main(lambda: read_inputs(args))
    starting_vocab_size = config["vocab_size"]   # of the weights to start from (--init_from)
    set_log_paths(args, checkpoint)
    device_type = processes.device_type
    precision = processes.share_from_main(lambda: choose_precision(plan["dtype"], device_type))
    configure_torch(device_type, plan["seed"] + processes.rank, processes.threads_per_process())
    dataset = load_text(args, plan, config, tokenizer, processes, say)
    if plan["batch_size"] == "auto":
        conversations = isinstance(dataset.train, PackedConversations)
        plan["batch_size"] = auto_batch_size(precision, config["block_size"], conversations)
    new_tokenizer = check_tokenizer_and_config(args, plan, config, dataset, checkpoint, tokenizer)
    check_memory(config, fix="start from a smaller model (distilgpt2), or train on a machine with more memory"
                 if from_gpt2_folder(args) else None)
    # The starting weights: rank 0 reads them; they reach the others through DistributedDataParallel.
    model = processes.share_from_main(lambda: load_starting_model(args, config, starting_vocab_size),
                                      elsewhere=lambda: GPTLanguageModel(config))

    # Everything is read: now the run's files.
    if processes.is_main:
        write_run_files(args, config, dataset, checkpoint, new_tokenizer)
    training = start_run(args, model.to(processes.device), plan, dataset, processes, precision, checkpoint)
    say(summary(training))
    if plan.get("init_from"):
        say(f"Fine-tuning {plan['init_from']}: {plan['optimizer']} at peak learning rate {plan['learning_rate']:g} "
            f"with {training.state.warmup_steps} warmup steps" +
            ("" if args.learning_rate is not None or args.optimizer is not None else
             " (small steps keep what the model learned; --learning_rate and --optimizer change them)") +
            f"; log: {args.metrics_path}, curve: {args.plot_path} (the first run's "
            f"{LOG_PATHS[False][0]} and {LOG_PATHS[False][1]} are kept)")
    say(speed_estimate(training))

    train_loop(training, args, tokenizer_hash(dataset.tokenizer))
    report(training, args, say)


def train_loop(run, args, tokenizer_key):
    """The run, step by step: what a step does, and when to evaluate, save and stop. Validation
    every eval_interval steps, at each epoch's end and after the last step; a checkpoint every
    checkpoint_interval steps or checkpoint_minutes, on Ctrl-C (then exit 130) and at the end."""
    state, steps, plan, processes = run.state, run.steps, run.plan, run.processes
    progress = Progress(None if run.budget else state.total_steps, state.step,
                        interactive=sys.stderr.isatty(), enabled=processes.is_main)
    window_losses, epoch_losses, last_checkpoint = [], [], run.clock.session()
    with StopRequest() as stop:
        while state.step < state.total_steps:
            # A step: the schedule's learning rate, gradients over a fresh draw of windows, applied.
            step_started = run.clock.session()
            lr = learning_rate_at(state.step, state.total_steps, plan["learning_rate"], state.warmup_steps,
                                  plan["min_lr_ratio"])
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            run.optimizer.zero_grad(set_to_none=True)
            offsets = random_offsets(run.generator, run.dataset.train, run.block_size,
                                     steps.batch_size * steps.micro_batches)
            loss = forward_backward(run.train_model, run.dataset.train, offsets, steps, processes, run.block_size,
                                    run.autocast)
            if plan["grad_clip"] > 0:   # 0: no clipping
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), plan["grad_clip"])
            run.optimizer.step()
            state.step += 1
            window_losses.append(loss)
            epoch_losses.append(loss)
            if run.budget:
                run.budget.record_step(run.clock.session() - step_started)
                fit_plan_to_budget(run, progress)
            progress.update(state.step, None if state.total_steps == UNMEASURED else state.total_steps, loss,
                            run.tokens_per_second(), run.seconds_left())

            if run.schedule.due(state.step, state.last_eval_step, state.total_steps):
                evaluation_started = run.clock.session()
                epoch_ends = run.schedule.epoch_ends(state.step, state.total_steps)
                evaluate_and_log(run, args, window_losses, epoch_losses if epoch_ends else None, lr, progress)
                window_losses, epoch_losses = [], ([] if epoch_ends else epoch_losses)
                if run.budget:   # the next estimate counts it
                    run.budget.record_evaluation(run.clock.session() - evaluation_started)

            stopping = processes.any(stop.requested)
            checkpoint_due = (state.step % args.checkpoint_interval == 0
                              or run.clock.session() - last_checkpoint > 60 * args.checkpoint_minutes)
            if processes.is_main and (stopping or checkpoint_due):
                save_checkpoint(run, args.checkpoint_path, tokenizer_key)
                last_checkpoint = run.clock.session()
            if stopping:
                progress.close()
                if processes.is_main:
                    terminal.say(f"Stopped at step {state.step}/{state.total_steps}; checkpoint saved to "
                                 f"{args.checkpoint_path}. Resume with: python train_llm.py --resume", sys.stderr)
                raise SystemExit(130)
        progress.close()
        if processes.is_main:
            save_checkpoint(run, args.checkpoint_path, tokenizer_key)


def fit_plan_to_budget(run, progress) -> None:
    """A timed run: the total is what fits in the time left, re-estimated at every step; the
    warmup is fixed at the first estimate (5% of it, at most 200, unless --warmup_steps)."""
    state, plan = run.state, run.plan
    if not run.budget.measured:
        return
    first = state.total_steps == UNMEASURED
    state.total_steps = max(state.step, run.budget.total_steps(
        state.step, run.clock.elapsed(), run.schedule.evaluations_per_step(), plan["eval_batches"]))
    if first and plan["warmup_steps"] is None:
        state.warmup_steps = default_warmup(state.total_steps, fine_tuning=bool(plan.get("init_from")))
    if first:
        progress.write(f"About {state.total_steps} steps fit in {plan['minutes']:g} min "
                       f"({run.budget.mean_step_seconds():.2f}s per step); the schedule is laid over them")


def evaluate_and_log(run, args, window_losses, epoch_losses, lr, progress) -> None:
    """Validation loss on the same windows every time; rank 0 saves the weights when they are the
    best so far and logs a row (with the training loss since the last evaluation). One line says
    it; at an epoch's end (epoch_losses given) with the epoch's mean training loss."""
    state, steps, processes = run.state, run.steps, run.processes
    state.last_eval_step = state.step
    # Every process evaluates the same windows, so they stay in step without waiting.
    val_loss = estimate_loss(run.model, run.dataset.val, steps.micro_batch_size, run.block_size,
                             run.plan["eval_batches"] * steps.batch_size // steps.micro_batch_size,
                             processes.device, run.autocast)

    def mean(losses):   # over every process's losses
        return processes.mean(float(np.mean(losses))) if losses else float("nan")

    train_loss = mean(window_losses)
    if val_loss < state.best_val:
        state.best_val, state.best_step = val_loss, state.step
        if processes.is_main:
            save_weights(run.model, args.output)
    if processes.is_main:
        append_log(args.metrics_path, {
            "step": state.step, "tokens": state.step * steps.tokens_per_step,
            "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5), "lr": lr,
            "tokens_per_s": round(run.tokens_per_second()), "elapsed_s": round(run.clock.elapsed(), 2),
            "time": round(time.time(), 3)})
    losses = f"validation loss {val_loss:.4f} (best {state.best_val:.4f} at step {state.best_step})"
    if epoch_losses is None:
        progress.write(f"step {state.step}: training loss {train_loss:.4f}, {losses}")
    else:
        epoch = (state.step - 1) // steps.steps_per_epoch + 1
        progress.write(f"Epoch {epoch}/{steps.n_epochs(state.total_steps)} ends at step {state.step}: training "
                       f"loss {mean(epoch_losses):.4f}, {losses}", sys.stdout)


def report(run, args, say):
    """The loss curve, and what the run achieved."""
    drawn = run.processes.is_main and plot_losses(args.metrics_path, args.plot_path)
    state, seconds = run.state, run.clock.session()
    steps_run = state.total_steps - run.first_step
    # Bits per character make char and BPE models comparable: loss per token / characters per token.
    budget = f" (budget {run.plan['minutes']:g} min)" if run.budget else ""
    memory = (f"; peak memory {peak_rss_bytes() / 2**30:.2f} GB (estimated {run.memory_estimate / 2**30:.2f})"
              if run.device_type == "cpu" else "")
    say(f"Saved {args.output}: weights from step {state.best_step} (validation loss {state.best_val:.4f} per token, "
        f"{state.best_val / math.log(2) / run.dataset.characters_per_token:.3f} bits per character); "
        f"{steps_run} steps in {seconds:.1f}s{budget}, {steps_run * run.steps.tokens_per_step / seconds:,.0f} "
        f"tokens/s{memory}. Log: {args.metrics_path}, curve: "
        + (args.plot_path if drawn else "none (the log has no rows: it was deleted after its last evaluation)"))


# ------------------------------------------------------------------ reading and checking the inputs

def read_inputs(args):
    """Rank 0: the checkpoint (--resume), the model config and tokenizer, and the plan."""
    checkpoint = upgrade_checkpoint(load_checkpoint(args.checkpoint_path), args.dtype) if args.resume else None
    set_log_paths(args, checkpoint)
    config, tokenizer = load_config_and_tokenizer(args)
    return checkpoint, config, tokenizer, ask_plan(args, checkpoint)


def set_log_paths(args, checkpoint) -> None:
    """A fine-tuning run keeps the first run's log and curve, and writes its own beside them."""
    fine_tuning = bool(checkpoint["plan"].get("init_from") if checkpoint else args.init_from)
    args.metrics_path = args.metrics_path or LOG_PATHS[fine_tuning][0]
    args.plot_path = args.plot_path or LOG_PATHS[fine_tuning][1]


def recipe_of(args) -> str:
    """Which of schedule.RECIPES the run's defaults come from."""
    return "gpt2" if from_gpt2_folder(args) else "trained weights" if args.init_from else "from scratch"


def from_gpt2_folder(args) -> bool:
    """--init_from names a Hugging Face GPT-2 folder (else trained weights, or nothing)."""
    return bool(args.init_from) and os.path.isdir(args.init_from)


def load_config_and_tokenizer(args):
    """The model config, and the tokenizer the run keeps (None: one is made from the text). From a
    GPT-2 folder both are its own, over whatever else model_config.pth holds; from trained weights
    (and on --resume) they are the first run's."""
    if from_gpt2_folder(args):
        config = load_config(args.config_path) if os.path.exists(args.config_path) else {}
        gpt2_config, tokenizer = read_gpt2_folder(args.init_from)
        config.update(gpt2_config, dropout=FINE_TUNING_DROPOUT, tokenizer="bpe")
        config.pop("vocab_size_requested", None)   # the size asked of a BPE trained here: none is
        return config, tokenizer
    config = load_config(args.config_path)
    return config, load_tokenizer(args.tokenizer_path) if (args.resume or args.init_from) else None


def load_starting_model(args, config, starting_vocab_size):
    """A new model, or the weights to fine-tune: a GPT-2 folder's, or trained_model.pth's, grown
    by rows for tokens their tokenizer gained here (the chat's)."""
    if not args.init_from:
        return GPTLanguageModel(config)
    weights_config = dict(config, vocab_size=starting_vocab_size)
    if from_gpt2_folder(args):
        model = load_gpt2_model(args.init_from, weights_config)
    else:
        model = load_trained_model(args.init_from, weights_config)
    model = grow_vocabulary(model, config["vocab_size"]).train()
    model.config.update(config)
    return model


def ask_plan(args, checkpoint) -> dict:
    """Rank 0: clear the way for the run's files, then the plan: the checkpoint's on --resume,
    else the answers to the questions and the plan flags. Makes a default text if there is none."""
    for path in (args.output, args.checkpoint_path, args.tokenizer_path, args.metrics_path, args.plot_path,
                 args.config_path, args.manifest_path):
        check_writable(path)
        remove_stale_temporaries(path)  # left by a run that was killed while writing
    if checkpoint:
        plan = checkpoint["plan"]
        terminal.say(f"Resuming from {args.checkpoint_path} at step {checkpoint['step']}")
    else:
        # A timed run's length is its time: the number of epochs is not asked.
        plan = ask("Configure training parameters:",
                   [q for q in questions(recipe_of(args))
                    if not (args.minutes and q.name == "max_epochs")], args)
        plan.setdefault("max_epochs", None)
        plan.update({name: getattr(args, name) for name in PLAN_FLAGS})
        plan["optimizer"] = args.optimizer or RECIPES[recipe_of(args)]["optimizer"]
    if plan["dataset_path"] == DEFAULT_TEXT and not os.path.exists(DEFAULT_TEXT):
        n_chars = build_default_text(DEFAULT_TEXT)
        terminal.say(f"No {DEFAULT_TEXT} here, so one was made for you: {n_chars:,} characters of Python's "
              "own documentation. Give --dataset_path to train on your text.")
    return plan


def load_text(args, plan, config, tokenizer, processes, say):
    """The text's tokens, with the given tokenizer (the run's own on --resume and --init_from), else
    a new one (BPE trained on the text, or the characters found while encoding it). Rank 0 prepares
    them first and fills the cache; the other processes then read them from it. Conversations
    (JSONL) are packed into windows instead, with the tokenizer grown by the chat's tokens."""
    started = time.time()
    with processes.main_first():
        corpus = find_documents(plan["dataset_path"], args.encoding)   # once per run: every later step uses it
        if is_chat_corpus(corpus):
            return load_conversations(corpus, config, tokenizer, started, say)
        if tokenizer is None and config.get("tokenizer") == "bpe":
            target = config.get("vocab_size_requested", config["vocab_size"])
            tokenizer, cached = bpe_tokenizer_for(corpus, target)
            config["vocab_size_requested"] = target
            say(f"BPE tokenizer: {tokenizer.get_vocab_size()} tokens" +
                (" (from the token cache)" if cached else f", trained in {time.time() - started:.1f}s"))
        dataset = prepare_dataset(corpus, tokenizer)
    check_split(dataset, config["block_size"], spec_text(plan["dataset_path"]))
    say(f"Text: {corpus.describe()}{dataset.n_characters:,} characters -> {len(dataset.train):,} training and "
        f"{len(dataset.val):,} validation tokens" + ("" if corpus.single else f" ({corpus.validation_rule()})")
        + f", {dataset.characters_per_token:.2f} characters per token"
        + (" (from the token cache)" if dataset.from_cache else f" (prepared in {time.time() - started:.1f}s)"))
    for note in dataset.notes:   # where the token cache is, when not beside the text; what was rebuilt or skipped
        say(note)
    return dataset


def check_tokenizer_and_config(args, plan, config, dataset, checkpoint, given_tokenizer) -> bool:
    """The tokenizer and the config must belong together: checked on --resume and --init_from
    (trained_model.pth). The config takes the real vocab_size and the text's path and encoding
    (convert_to_gguf.py checks the model on its held-out part). True when the tokenizer is new
    (made here, a GPT-2 folder's, or grown by the chat's tokens) and is to be saved."""
    tokenizer = dataset.tokenizer
    if checkpoint:
        check_resume(checkpoint, config, tokenizer, dataset)
        return False
    from_weights = bool(args.init_from) and not from_gpt2_folder(args)
    if from_weights:
        check_tokenizer_fits(given_tokenizer, config, args.tokenizer_path, args.config_path)
    config["vocab_size"] = tokenizer.get_vocab_size()
    config["dataset_path"], config["dataset_encoding"] = absolute_spec(plan["dataset_path"]), args.encoding
    return not from_weights or tokenizer is not given_tokenizer


def load_conversations(corpus, config, tokenizer, started, say):
    """The conversations packed into windows (conversations.py), and what they are."""
    if tokenizer is None and config.get("tokenizer") == "bpe":
        config["vocab_size_requested"] = config.get("vocab_size_requested", config["vocab_size"])
    dataset = prepare_conversations(corpus, tokenizer, config)
    if tokenizer is not None and dataset.tokenizer is not tokenizer:
        say(f"The tokenizer gains the chat's tokens: {tokenizer.get_vocab_size()} -> "
            f"{dataset.tokenizer.get_vocab_size()} tokens (the model grows by as many rows)")
    say(dataset.describe() + f" (prepared in {time.time() - started:.1f}s)")
    for note in dataset.notes:
        say(note)
    return dataset


# ------------------------------------------------------------------ writing, and the run's start

def write_run_files(args, config, dataset, checkpoint, new_tokenizer: bool) -> None:
    """Rank 0, once every input is checked: the tokenizer and config of a new run, the manifest of
    the files it trains on (resumed runs included), and the log: a resumed run's continues, a new
    run's starts anew."""
    if not checkpoint:
        if new_tokenizer:
            save_tokenizer(dataset.tokenizer, args.tokenizer_path)
        save_config(config, args.config_path)
        if new_tokenizer:
            terminal.say(f"Tokenizer: vocabulary of {config['vocab_size']} "
                  + ("(byte-level BPE" if config.get("tokenizer") == "bpe"
                     else "(one token per character, plus byte fallback")
                  + (f" of {args.init_from}" if args.init_from else "")
                  + f") saved to {args.tokenizer_path}")
    with atomic_path(args.manifest_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dataset.corpus.manifest(), f, indent=1)
    if checkpoint:
        continue_log(args.metrics_path, checkpoint["step"])
    elif os.path.exists(args.metrics_path):
        os.remove(args.metrics_path)


def start_run(args, model, plan, dataset, processes, precision, checkpoint) -> Run:
    """The optimizer, the batch split, the state (new, or the checkpoint's), and the model as it
    trains: compiled on CUDA, under DistributedDataParallel with several processes."""
    device_type = processes.device_type
    block_size = model.config["block_size"]
    optimizer = make_optimizer(model, plan["learning_rate"], plan["weight_decay"], device_type, plan["optimizer"],
                               precision.dtype)
    generator = np.random.default_rng(plan["seed"])  # the same on every process: they share the draw
    # On a GPU the batch runs whole; on a CPU it is split to fit the memory budget.
    micro_batch_size = (plan["batch_size"] if device_type == "cuda" else
                        micro_batch_for(model.config, plan["batch_size"], args.memory_gb * 2**30, precision.autocast))
    fresh = StepPlan.of(plan, len(dataset.train), block_size, processes.world_size, micro_batch_size)
    total_steps = fresh.planned_steps(plan)
    state = LoopState(total_steps=total_steps, micro_batch_size=micro_batch_size,
                      warmup_steps=plan["warmup_steps"] if plan["warmup_steps"] is not None else
                      default_warmup(total_steps, fine_tuning=bool(plan.get("init_from"))))
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
               first_step=state.step)


if __name__ == "__main__":
    run(main)
