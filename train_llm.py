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

import json
import math
import os
import sys
import time

import torch

from custom_llm.atomic import atomic_path, check_writable, remove_stale_temporaries
from custom_llm.cli import ArgumentParser, Question, add_question_flags, ask, run
from custom_llm.corpus import absolute_spec, find_documents, parse_dataset_answer, spec_text
from custom_llm.data import check_split, prepare_dataset
from custom_llm.default_text import build_default_text
from custom_llm.distributed import Processes
from custom_llm.errors import UserError
from custom_llm.files import (check_resume, check_tokenizer_fits, load_checkpoint, load_config, load_trained_model,
                              save_config)
from custom_llm.flags import NUMBERS
from custom_llm.gpt2 import check_starting_point, load_gpt2_model, read_gpt2_folder
from custom_llm.memory import check_memory
from custom_llm.model import GPTLanguageModel
from custom_llm.resources import peak_rss_bytes
from custom_llm.schedule import RECIPES
from custom_llm.tokenizer import load_tokenizer, save_tokenizer
from custom_llm.tokens_cache import bpe_tokenizer_for
from custom_llm.training import StopRequest, TrainingRun, continue_log, pick_device, plot_losses

DEFAULT_TEXT = "input.txt"
FINE_TUNING_DROPOUT = 0.1   # GPT-2's own; nanoGPT's advice for fine-tuning is 0.1 or more
# Where a run's log and loss curve go: a fine-tuning run keeps the first run's.
LOG_PATHS = {False: ("training_log.jsonl", "loss_curve.png"), True: ("finetune_log.jsonl", "finetune_loss_curve.png")}


def questions(recipe: str):
    fine_tuning = recipe != "from scratch"
    return [
        Question("batch_size", "Batch size in windows (auto: 64 where bfloat16 is fast, else 32; fewer for "
                 "windows over 128 tokens)", "auto",
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
    finally:
        processes.close()


def train(args, processes):
    """Ask, load, train, save, report. Only rank 0 asks, talks and writes."""
    say = print if processes.is_main else (lambda *a, **k: None)
    checkpoint = load_checkpoint(args.checkpoint_path) if args.resume else None
    fine_tuning = bool(checkpoint["plan"].get("init_from") if checkpoint else args.init_from)
    args.metrics_path = args.metrics_path or LOG_PATHS[fine_tuning][0]
    args.plot_path = args.plot_path or LOG_PATHS[fine_tuning][1]
    config, tokenizer = load_config_and_tokenizer(args)
    plan = processes.share(ask_plan(args, checkpoint) if processes.is_main else None)
    torch.manual_seed(plan["seed"] + processes.rank)
    torch.set_num_threads(processes.threads_per_process())

    dataset = load_text(args, plan, config, tokenizer, processes, say)
    pair_tokenizer_and_config(args, plan, config, dataset, checkpoint, processes.is_main, say)
    if processes.is_main:  # the files this run trains on, resumed runs included
        with atomic_path(args.manifest_path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(dataset.corpus.manifest(), f, indent=1)
    check_memory(config, fix="start from a smaller model (distilgpt2), or train on a machine with more memory"
                 if from_gpt2_folder(args) else None)
    model = load_starting_model(args, config)
    training = TrainingRun(model.to(processes.device), plan, dataset, processes, args.compile, args.memory_gb,
                           checkpoint)
    if processes.is_main and checkpoint:
        continue_log(args.metrics_path, checkpoint["step"])
    elif processes.is_main and os.path.exists(args.metrics_path):
        os.remove(args.metrics_path)  # a new run starts a new log
    say(training.summary())
    if fine_tuning:
        say(f"Fine-tuning {plan['init_from']}: {plan['optimizer']} at peak learning rate {plan['learning_rate']:g} "
            f"with {training.steps.warmup_steps} warmup steps" +
            ("" if args.learning_rate is not None or args.optimizer is not None else
             " (small steps keep what the model learned; --learning_rate and --optimizer change them)") +
            f"; log: {args.metrics_path}, curve: {args.plot_path} (the first run's "
            f"{LOG_PATHS[False][0]} and {LOG_PATHS[False][1]} are kept)")
    say(training.speed_estimate())

    train_loop(training, args)
    report(training, args, say)


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


def load_starting_model(args, config):
    """A new model, or the weights to fine-tune: a GPT-2 folder's, or trained_model.pth's."""
    if not args.init_from:
        return GPTLanguageModel(config)
    if from_gpt2_folder(args):
        return load_gpt2_model(args.init_from, config).train()
    return load_trained_model(args.init_from, config).train()


def ask_plan(args, checkpoint) -> dict:
    """Rank 0: clear the way for the run's files, then the plan: the checkpoint's on --resume,
    else the answers to the questions and the plan flags. Makes a default text if there is none."""
    for path in (args.output, args.checkpoint_path, args.tokenizer_path, args.metrics_path, args.plot_path,
                 args.config_path, args.manifest_path):
        check_writable(path)
        remove_stale_temporaries(path)  # left by a run that was killed while writing
    if checkpoint:
        plan = checkpoint["plan"]
        plan.setdefault("optimizer", "adamw")  # checkpoints from before Muon trained with AdamW
        plan.setdefault("dtype", args.dtype)
        print(f"Resuming from {args.checkpoint_path} at step {checkpoint['step']}")
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
        print(f"No {DEFAULT_TEXT} here, so one was made for you: {n_chars:,} characters of Python's "
              "own documentation. Give --dataset_path to train on your text.")
    return plan


def load_text(args, plan, config, tokenizer, processes, say):
    """The text's tokens, with the given tokenizer (the run's own on --resume and --init_from), else
    a new one (BPE trained on the text, or the characters found while encoding it). Rank 0 prepares
    them first and fills the cache; the other processes then read them from it."""
    started = time.time()
    with processes.main_first():
        corpus = find_documents(plan["dataset_path"], args.encoding)   # once per run: every later step uses it
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


def pair_tokenizer_and_config(args, plan, config, dataset, checkpoint, is_main, say):
    """The tokenizer and the config must belong together: checked on --resume and --init_from
    (trained_model.pth); a new run, or one from a GPT-2 folder, saves its tokenizer. The config is
    saved with its real vocab_size and the text's path and encoding (convert_to_gguf.py checks the
    model on its held-out part)."""
    tokenizer = dataset.tokenizer
    if checkpoint:
        check_resume(checkpoint, config, tokenizer, dataset)
        return
    from_weights = args.init_from and not from_gpt2_folder(args)
    if from_weights:
        check_tokenizer_fits(tokenizer, config, args.tokenizer_path, args.config_path)
    config["vocab_size"] = tokenizer.get_vocab_size()
    config["dataset_path"], config["dataset_encoding"] = absolute_spec(plan["dataset_path"]), args.encoding
    if is_main:
        if not from_weights:
            save_tokenizer(tokenizer, args.tokenizer_path)
        save_config(config, args.config_path)
    if not from_weights:
        say(f"Tokenizer: vocabulary of {config['vocab_size']} "
            + ("(byte-level BPE" if config.get("tokenizer") == "bpe"
               else "(one token per character, plus byte fallback")
            + (f" of {args.init_from}" if args.init_from else "")
            + f") saved to {args.tokenizer_path}")


def train_loop(training, args):
    """Steps to the end of the plan. Validation every eval_interval steps and at each epoch's
    end; a checkpoint every checkpoint_interval steps or checkpoint_minutes, on Ctrl-C (then
    exit 130) and at the end."""
    is_main = training.processes.is_main
    with StopRequest() as stop:
        while not training.done:
            training.train_step()
            if training.evaluation_due():
                training.evaluate_and_log(args.output, args.metrics_path)
            stopping = training.processes.any(stop.requested)
            if is_main and (stopping or training.checkpoint_due(args.checkpoint_interval, args.checkpoint_minutes)):
                training.save_checkpoint(args.checkpoint_path)
            if stopping:
                training.close_progress()
                if is_main:
                    print(f"Stopped at step {training.step}/{training.steps.total_steps}; checkpoint saved to "
                          f"{args.checkpoint_path}. Resume with: python train_llm.py --resume", file=sys.stderr)
                raise SystemExit(130)
            if training.epoch_ended():
                training.end_epoch()
        training.close_progress()
        if is_main:
            training.save_checkpoint(args.checkpoint_path)


def report(training, args, say):
    """The loss curve, and what the run achieved."""
    elapsed = time.time() - training.started
    if training.processes.is_main:
        plot_losses(args.metrics_path, args.plot_path)
    s, best_val = training.steps, training.best_val
    steps_run = s.total_steps - training.tokens_at_start // s.tokens_per_step
    tokens_run = s.total_steps * s.tokens_per_step - training.tokens_at_start
    # Bits per character make char and BPE models comparable: loss per token / characters per token.
    budget = f" (budget {training.plan['minutes']:g} min)" if training.budget else ""
    memory = (f"; peak memory {peak_rss_bytes() / 2**30:.2f} GB (estimated {training.memory_estimate / 2**30:.2f})"
              if training.device_type == "cpu" else "")
    say(f"Saved {args.output}: weights from step {training.best_step} (validation loss {best_val:.4f} per token, "
        f"{best_val / math.log(2) / training.dataset.characters_per_token:.3f} bits per character); "
        f"{steps_run} steps in {elapsed:.1f}s{budget}, {tokens_run / elapsed:,.0f} tokens/s{memory}. "
        f"Log: {args.metrics_path}, curve: {args.plot_path}")


if __name__ == "__main__":
    run(main)
