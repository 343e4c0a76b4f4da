"""Stage 2: build a tokenizer from your text and train the GPT on it.

    python train_llm.py                                   # answer the questions
    python train_llm.py --dataset_path my.txt --max_steps 200 -y
    python train_llm.py --resume                          # continue an interrupted run
    python train_llm.py --init_from trained_model.pth --dataset_path more.txt   # train further

Reads model_config.pth (from llm_model.py), writes tokenizer.json, updates the config's
vocab_size, and saves trained_model.pth: the weights from the evaluation with the best validation
loss. A resumable checkpoint is saved every few hundred steps, every few minutes and on Ctrl-C.
"""

import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from custom_llm.cli import (ArgumentParser, Question, UserError, add_question_flags, ask, atomic_path,
                            check_writable, existing_file, positive_float, positive_int,
                            remove_stale_temporaries, run)
from custom_llm.data import (bpe_tokenizer_for, check_split, get_batch, prepare_dataset, random_offsets,
                             tokenizer_hash)
from custom_llm.default_text import build_default_text
from custom_llm.distributed import Processes
from custom_llm.tokenizer import load_tokenizer, save_tokenizer
from custom_llm.training import (StopRequest, check_resume, estimate_loss, learning_rate_at, load_checkpoint,
                                 make_optimizer, pick_device, pick_dtype, plot_losses, save_checkpoint)
from llm_model import GPTLanguageModel, check_memory, load_config, load_trained_model, save_config

DEFAULT_TEXT = "input.txt"
QUESTIONS = [
    Question("batch_size", "Batch size", 128, positive_int),
    Question("learning_rate", "Learning rate", 0.015, positive_float),
    Question("max_epochs", "Number of epochs", 5, positive_int),
    Question("dataset_path", "Path to your text file", DEFAULT_TEXT, existing_file),
]


# Flags that shape the run's result: kept in the checkpoint, so --resume follows the same plan.
PLAN_FLAGS = ("max_steps", "seed", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
              "eval_interval", "eval_batches", "grad_accum_steps", "optimizer", "dtype")


def parse_args():
    parser = ArgumentParser(description="Train your GPT on a text file.")
    add_question_flags(parser, QUESTIONS)
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (quick trials)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--config_path", default="model_config.pth")
    parser.add_argument("--output", default="trained_model.pth", help="where to save the best weights")
    parser.add_argument("--tokenizer_path", default="tokenizer.json")
    parser.add_argument("--encoding", default="utf-8", help="the text file's encoding")
    parser.add_argument("--eval_interval", type=int, default=250,
                        help="steps between validation runs (default 250; also at the end of every epoch)")
    parser.add_argument("--eval_batches", type=int, default=10,
                        help="batches of batch_size windows per validation run (default 10)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="default: 5%% of the steps, at most 200")
    parser.add_argument("--min_lr_ratio", type=float, default=0.1, help="the schedule decays to lr × this")
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--grad_clip", type=float, default=1.0)
    parser.add_argument("--grad_accum_steps", type=int, default=1,
                        help="micro-batches per step: the same effective batch on fewer processes")
    parser.add_argument("--optimizer", choices=["muon", "adamw"], default="muon",
                        help="muon (default): Muon for the blocks' matrices, AdamW for the rest; adamw: AdamW only")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="autocast type; auto: bfloat16 on CUDA and on CPUs with AMX, float32 elsewhere")
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                        help="torch.compile; auto: on CUDA only")
    parser.add_argument("--checkpoint_path", default="checkpoint.pth", help="resumable training state")
    parser.add_argument("--checkpoint_interval", type=int, default=500, help="save a checkpoint every N steps")
    parser.add_argument("--checkpoint_minutes", type=float, default=5.0,
                        help="and whenever this many minutes passed since the last one")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint_path")
    parser.add_argument("--init_from", default=None,
                        help="start from these trained weights (with tokenizer.json), on a new text")
    parser.add_argument("--metrics_path", default="training_log.jsonl", help="one JSON line per evaluation")
    parser.add_argument("--plot_path", default="loss_curve.png", help="loss curve written at the end")
    args = parser.parse_args()
    for name in ("max_steps", "eval_interval", "eval_batches", "checkpoint_interval", "grad_accum_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name}: {value} must be a positive whole number", 2)
    if args.resume and args.init_from:
        raise UserError("--resume and --init_from exclude each other: resume continues a run, "
                        "init_from starts a new one from trained weights", 2)
    return args


def main():
    args = parse_args()
    processes = Processes(pick_device(args.device))
    try:
        train(args, processes)
    finally:
        processes.close()


def train(args, processes):
    say = print if processes.is_main else (lambda *a, **k: None)  # only rank 0 talks and writes
    device = processes.device
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    # Ask and load: the plan, the config, the text and its tokens.
    config = load_config(args.config_path)
    checkpoint = load_checkpoint(args.checkpoint_path) if args.resume else None
    if processes.is_main:
        for path in (args.output, args.checkpoint_path, args.tokenizer_path, args.metrics_path, args.plot_path,
                     args.config_path):
            check_writable(path)
            remove_stale_temporaries(path)  # left by a run that was killed while writing
        if checkpoint:
            plan = checkpoint["plan"]
            plan.setdefault("optimizer", "adamw")  # checkpoints from before Muon trained with AdamW
            plan.setdefault("dtype", args.dtype)
            print(f"Resuming from {args.checkpoint_path} at step {checkpoint['step']}")
        else:
            plan = ask("Configure training parameters:", QUESTIONS, args)
            plan.update({name: getattr(args, name) for name in PLAN_FLAGS})
        if plan["dataset_path"] == DEFAULT_TEXT and not os.path.exists(DEFAULT_TEXT):
            n_chars = build_default_text(DEFAULT_TEXT)
            print(f"No {DEFAULT_TEXT} here, so one was made for you: {n_chars:,} characters of Python's "
                  "own documentation. Give --dataset_path to train on your text.")
    plan = processes.share(plan if processes.is_main else None)
    torch.manual_seed(plan["seed"] + processes.rank)
    torch.set_num_threads(processes.threads_per_process())

    given_tokenizer = load_tokenizer(args.tokenizer_path) if (args.resume or args.init_from) else None
    bpe = config.get("tokenizer", "char") == "bpe"
    started_prep = time.time()
    if not processes.is_main:
        processes.barrier()  # rank 0 prepares (and caches) the tokenizer and tokens first
    if given_tokenizer is None and bpe:
        target = config.get("vocab_size_requested", config["vocab_size"])
        given_tokenizer, cached = bpe_tokenizer_for(plan["dataset_path"], args.encoding, target)
        config["vocab_size_requested"] = target
        say(f"BPE tokenizer: {given_tokenizer.get_vocab_size()} tokens" +
            (" (from the token cache)" if cached else f", trained in {time.time() - started_prep:.1f}s"))
    dataset = prepare_dataset(plan["dataset_path"], args.encoding, given_tokenizer)
    if processes.is_main:
        processes.barrier()
    tokenizer = dataset.tokenizer
    block_size = config["block_size"]
    check_split(dataset, block_size, plan["dataset_path"])
    chars_per_token = dataset.n_characters / len(dataset.tokens)
    say(f"Text: {dataset.n_characters:,} characters -> {len(dataset.train):,} training and "
        f"{len(dataset.val):,} validation tokens, {chars_per_token:.2f} characters per token"
        + (" (from the token cache)" if dataset.from_cache else f" (prepared in {time.time() - started_prep:.1f}s)"))

    if checkpoint:
        check_resume(checkpoint, config, tokenizer, dataset)
    elif args.init_from:
        if tokenizer.get_vocab_size() != config["vocab_size"]:
            raise UserError(f"{args.tokenizer_path} has {tokenizer.get_vocab_size()} tokens but "
                            f"{args.config_path} says vocab_size {config['vocab_size']}: they are not a pair")
    else:
        config["vocab_size"] = tokenizer.get_vocab_size()
        config["dataset_path"] = os.path.abspath(plan["dataset_path"])  # convert_to_gguf.py checks on its held-out part
        if processes.is_main:
            save_tokenizer(tokenizer, args.tokenizer_path)
            save_config(config, args.config_path)
        say(f"Tokenizer: vocabulary of {config['vocab_size']} "
            + ("(byte-level BPE" if bpe else "(one token per character, plus byte fallback")
            + f") saved to {args.tokenizer_path}")

    # Model, optimizer, schedule. Each step trains on batch_size windows per process and
    # accumulation step: processes × grad_accum_steps micro-batches drawn together, so the same
    # effective batch gives the same training on any number of processes.
    batch_size, accumulation = plan["batch_size"], plan["grad_accum_steps"]
    check_memory(config, batch_size)
    model = (load_trained_model(args.init_from, config).train() if args.init_from
             else GPTLanguageModel(config)).to(device)
    optimizer = make_optimizer(model, plan["learning_rate"], plan["weight_decay"], device_type, plan["optimizer"])
    generator = np.random.default_rng(plan["seed"])  # the same on every process: they share the draw
    micro_batches = processes.world_size * accumulation
    tokens_per_step = batch_size * block_size * micro_batches
    steps_per_epoch = max(1, math.ceil(len(dataset.train) / tokens_per_step))
    total_steps = plan["max_epochs"] * steps_per_epoch
    if plan["max_steps"]:
        total_steps = min(total_steps, plan["max_steps"])
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = plan["warmup_steps"] if plan["warmup_steps"] is not None else min(200, max(1, total_steps // 20))
    step, best_val, best_step, elapsed_before, val_loss = 0, float("inf"), None, 0.0, float("nan")
    last_eval_step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if processes.is_main:
            torch.set_rng_state(checkpoint["torch_rng"])
        generator.bit_generator.state = checkpoint["numpy_rng"]
        step, best_val, best_step = checkpoint["step"], checkpoint["best_val"], checkpoint["best_step"]
        last_eval_step = checkpoint.get("last_eval_step", step - step % plan["eval_interval"])
        elapsed_before = checkpoint["elapsed"]
    elif processes.is_main and os.path.exists(args.metrics_path):
        os.remove(args.metrics_path)  # a new run starts a new log

    use_bf16 = pick_dtype(plan["dtype"], device_type) == torch.bfloat16
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compiled = args.compile == "yes" or (args.compile == "auto" and device_type == "cuda")
    train_model = torch.compile(model) if compiled else model
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(
            train_model, device_ids=[processes.local_rank] if device_type == "cuda" else None)

    def autocast():
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_bf16)

    def checkpoint_state():
        return {"step": step, "best_val": best_val, "best_step": best_step, "last_eval_step": last_eval_step,
                "config": config, "plan": plan,
                "tokenizer_hash": tokenizer_hash(tokenizer), "text_hash": dataset.text_hash,
                "elapsed": elapsed_before + time.time() - started}

    say(f"Training on {device_type} with {model.num_parameters() / 1e6:.2f}M parameters: {n_epochs} epoch(s) "
        f"of {steps_per_epoch} steps, {total_steps} steps in all; effective batch {batch_size * micro_batches} "
        f"windows ({tokens_per_step:,} tokens) = {batch_size} x {processes.world_size} process(es) x "
        f"{accumulation} accumulation step(s); {plan['optimizer']}, peak learning rate "
        f"{plan['learning_rate']:g}"
        + (", bfloat16 autocast" if use_bf16 else "") + (", compiled" if compiled else ""))

    # Train.
    started = last_checkpoint = time.time()
    window_losses, tokens_at_start = [], step * tokens_per_step
    interactive = processes.is_main and sys.stderr.isatty()
    with StopRequest() as stop:
        while step < total_steps:
            epoch = step // steps_per_epoch
            epoch_end = min(total_steps, (epoch + 1) * steps_per_epoch)
            progress = tqdm(total=epoch_end - epoch * steps_per_epoch, initial=step - epoch * steps_per_epoch,
                            desc=f"Epoch {epoch + 1}/{n_epochs}", unit="step", dynamic_ncols=True,
                            leave=False, disable=not interactive)
            epoch_losses = []
            while step < epoch_end:
                lr = learning_rate_at(step, total_steps, plan["learning_rate"], warmup_steps, plan["min_lr_ratio"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                offsets = random_offsets(generator, len(dataset.train), block_size, batch_size * micro_batches)
                optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                for micro in range(accumulation):
                    part = (micro * processes.world_size + processes.rank) * batch_size
                    x, y = get_batch(dataset.train, offsets[part:part + batch_size], block_size, device)
                    last = micro == accumulation - 1
                    with (contextlib.nullcontext() if last or not processes.distributed else train_model.no_sync()):
                        with autocast():
                            _, loss = train_model(x, y)
                        (loss / accumulation).backward()
                    loss_value += loss.item() / accumulation
                torch.nn.utils.clip_grad_norm_(model.parameters(), plan["grad_clip"])
                optimizer.step()
                step += 1
                epoch_losses.append(loss_value)
                window_losses.append(loss_value)
                tokens_per_s = (step * tokens_per_step - tokens_at_start) / (time.time() - started)
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}")

                # Validate every eval_interval steps since the last validation, and at every epoch's end.
                if step - last_eval_step >= plan["eval_interval"] or step == epoch_end:
                    last_eval_step = step
                    # Every process evaluates the same windows, so they stay in step without waiting.
                    val_loss = estimate_loss(model, dataset.val, batch_size, block_size,
                                             plan["eval_batches"], device, autocast)
                    train_loss = processes.mean(float(np.mean(window_losses)))
                    window_losses = []
                    if processes.is_main:
                        if val_loss < best_val:
                            with atomic_path(args.output) as tmp:
                                torch.save(model.state_dict(), tmp)
                        with open(args.metrics_path, "a") as log:
                            log.write(json.dumps({
                                "step": step, "tokens": step * tokens_per_step,
                                "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
                                "lr": lr, "tokens_per_s": round(tokens_per_s),
                                "elapsed_s": round(elapsed_before + time.time() - started, 2),
                                "time": round(time.time(), 3)}) + "\n")
                    if val_loss < best_val:
                        best_val, best_step = val_loss, step
                    if interactive:
                        progress.write(f"step {step}: validation loss {val_loss:.4f}")
                stopping = processes.any(stop.requested)
                if processes.is_main and (step % args.checkpoint_interval == 0 or stopping
                                          or time.time() - last_checkpoint > 60 * args.checkpoint_minutes):
                    save_checkpoint(args.checkpoint_path, model, optimizer, generator, checkpoint_state())
                    last_checkpoint = time.time()
                if stopping:
                    progress.close()
                    if processes.is_main:
                        print(f"Stopped at step {step}/{total_steps}; checkpoint saved to {args.checkpoint_path}. "
                              f"Resume with: python train_llm.py --resume", file=sys.stderr)
                    raise SystemExit(130)
            progress.close()
            epoch_loss = processes.mean(float(np.mean(epoch_losses))) if epoch_losses else float("nan")
            say(f"Epoch {epoch + 1}/{n_epochs}, Loss: {epoch_loss:.4f}, "
                f"Validation loss: {val_loss:.4f} (best {best_val:.4f} at step {best_step})", flush=True)
        if processes.is_main:
            save_checkpoint(args.checkpoint_path, model, optimizer, generator, checkpoint_state())

    elapsed = time.time() - started
    if processes.is_main:
        plot_losses(args.metrics_path, args.plot_path)
    # Bits per character make char and BPE models comparable: loss per token / characters per token.
    say(f"Saved {args.output}: weights from step {best_step} (validation loss {best_val:.4f} per token, "
        f"{best_val / math.log(2) / chars_per_token:.3f} bits per character); "
        f"{total_steps - tokens_at_start // tokens_per_step} "
        f"steps in {elapsed:.1f}s, {(total_steps * tokens_per_step - tokens_at_start) / elapsed:,.0f} tokens/s. "
        f"Log: {args.metrics_path}, curve: {args.plot_path}")


if __name__ == "__main__":
    run(main)
