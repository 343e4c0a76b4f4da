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

import math
import sys
import time

import numpy as np
import torch

from custom_llm import start, terminal
from custom_llm.cli import ArgumentParser, Question, add_question_flags, run
from custom_llm.corpus import parse_dataset_answer
from custom_llm.distributed import Processes
from custom_llm.errors import UserError
from custom_llm.files import save_weights
from custom_llm.flags import NUMBERS
from custom_llm.gpt2_folder import check_starting_point
from custom_llm.memory import check_memory
from custom_llm.model import build_model
from custom_llm.precision import choose_precision
from custom_llm.progress import Progress
from custom_llm.resources import peak_rss_bytes
from custom_llm.schedule import RECIPES, default_warmup, learning_rate_at
from custom_llm.tokenizer import tokenizer_hash
from custom_llm.training import (UNMEASURED, StopRequest, append_log, auto_batch_size, configure_torch,
                                 estimate_loss, forward_backward, pick_device, plot_losses, save_checkpoint,
                                 speed_estimate, summary)


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
                 start.DEFAULT_TEXT, parse_dataset_answer, several=True),
    ]


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
    files, talks and writes; the other processes get what it read and need only the data."""
    say = terminal.say if processes.is_main else (lambda *a, **k: None)

    # Set up: everything is read and checked before anything is written, so a failure leaves
    # every file as it was.
    setup = processes.share_from_main(lambda: start.read_setup(args, questions))
    plan, config = setup.plan, setup.config
    precision = processes.share_from_main(lambda: choose_precision(plan["dtype"], processes.device_type))
    configure_torch(processes.device_type, plan["seed"] + processes.rank, processes.threads_per_process())
    dataset = start.load_dataset(setup, args.encoding, processes, say)
    if plan["batch_size"] == "auto":
        plan["batch_size"] = auto_batch_size(precision, dataset.sequence_length, config["block_size"],
                                             dataset.sparse_targets)
    new_tokenizer = start.complete_config(setup, dataset, args.encoding)
    check_memory(config, fix="start from a smaller model (distilgpt2), or train on a machine with more memory"
                 if setup.start.kind == start.GPT2_FOLDER else None)
    # The starting weights: rank 0 reads them; they reach the others through DistributedDataParallel.
    model = processes.share_from_main(lambda: start.load_starting_model(setup), elsewhere=lambda: build_model(config))

    # Everything is read: now the run's files, and the run.
    if processes.is_main:
        start.write_run_files(setup, dataset, new_tokenizer)
    training = start.build_run(setup, args, model.to(processes.device), dataset, processes, precision)
    say(summary(training))
    if setup.start.fine_tuning:
        say(f"Fine-tuning {plan['init_from']}: {plan['optimizer']} at peak learning rate {plan['learning_rate']:g} "
            f"with {training.state.warmup_steps} warmup steps" +
            ("" if args.learning_rate is not None or args.optimizer is not None else
             " (small steps keep what the model learned; --learning_rate and --optimizer change them)") +
            f"; log: {setup.files.metrics}, curve: {setup.files.plot} (the first run's "
            f"{start.LOG_PATHS[False][0]} and {start.LOG_PATHS[False][1]} are kept)")
    say(speed_estimate(training))

    train_loop(training, tokenizer_hash(dataset.tokenizer))
    report(training, say)


def train_loop(run, tokenizer_key):
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
            offsets = run.dataset.draw("train", run.generator, steps.batch_size * steps.micro_batches)
            loss = forward_backward(run.train_model, run.dataset, offsets, steps, processes, run.autocast)
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
                evaluate_and_log(run, window_losses, epoch_losses if epoch_ends else None, lr, progress)
                window_losses, epoch_losses = [], ([] if epoch_ends else epoch_losses)
                if run.budget:   # the next estimate counts it
                    run.budget.record_evaluation(run.clock.session() - evaluation_started)

            stopping = processes.any(stop.requested)
            checkpoint_due = (state.step % run.checkpoint_interval == 0
                              or run.clock.session() - last_checkpoint > run.checkpoint_seconds)
            if processes.is_main and (stopping or checkpoint_due):
                save_checkpoint(run, tokenizer_key)
                last_checkpoint = run.clock.session()
            if stopping:
                progress.close()
                if processes.is_main:
                    terminal.say(f"Stopped at step {state.step}/{state.total_steps}; checkpoint saved to "
                                 f"{run.files.checkpoint}. Resume with: python train_llm.py --resume", sys.stderr)
                raise SystemExit(130)
        progress.close()
        if processes.is_main:
            save_checkpoint(run, tokenizer_key)


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
        state.warmup_steps = default_warmup(state.total_steps, fine_tuning=run.fine_tuning)
    if first:
        progress.write(f"About {state.total_steps} steps fit in {plan['minutes']:g} min "
                       f"({run.budget.mean_step_seconds():.2f}s per step); the schedule is laid over them")


def evaluate_and_log(run, window_losses, epoch_losses, lr, progress) -> None:
    """Validation loss on the same windows every time; rank 0 saves the weights when they are the
    best so far and logs a row (with the training loss since the last evaluation). One line says
    it; at an epoch's end (epoch_losses given) with the epoch's mean training loss."""
    state, steps, processes = run.state, run.steps, run.processes
    state.last_eval_step = state.step
    # Every process evaluates the same windows, so they stay in step without waiting.
    val_loss = estimate_loss(run.model, run.dataset, steps.micro_batch_size,
                             run.plan["eval_batches"] * steps.batch_size // steps.micro_batch_size,
                             processes.device, run.autocast)

    def mean(losses):   # over every process's losses
        return processes.mean(float(np.mean(losses))) if losses else float("nan")

    train_loss = mean(window_losses)
    if val_loss < state.best_val:
        state.best_val, state.best_step = val_loss, state.step
        if processes.is_main:
            save_weights(run.model, run.files.output)
    if processes.is_main:
        append_log(run.files.metrics, {
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


def report(run, say):
    """The loss curve, and what the run achieved."""
    files = run.files
    drawn = run.processes.is_main and plot_losses(files.metrics, files.plot)
    state, seconds = run.state, run.clock.session()
    steps_run = state.total_steps - run.first_step
    # Bits per character make char and BPE models comparable: loss per token / characters per token.
    budget = f" (budget {run.plan['minutes']:g} min)" if run.budget else ""
    memory = (f"; peak memory {peak_rss_bytes() / 2**30:.2f} GB (estimated {run.memory_estimate / 2**30:.2f})"
              if run.device_type == "cpu" else "")
    say(f"Saved {files.output}: weights from step {state.best_step} (validation loss {state.best_val:.4f} per token, "
        f"{state.best_val / math.log(2) / run.dataset.characters_per_token:.3f} bits per character); "
        f"{steps_run} steps in {seconds:.1f}s{budget}, {steps_run * run.steps.tokens_per_step / seconds:,.0f} "
        f"tokens/s{memory}. Log: {files.metrics}, curve: "
        + (files.plot if drawn else "none (the log has no rows: it was deleted after its last evaluation)"))


if __name__ == "__main__":
    run(main)
