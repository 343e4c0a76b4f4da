"""Stage 2: build a tokenizer from your text and train the GPT on it.

    python train_llm.py                                  # answer the questions
    python train_llm.py --dataset_path my.txt --max_steps 200 -y

Reads model_config.pth (from llm_model.py), writes tokenizer.json, updates the config's
vocab_size, and saves trained_model.pth: the weights from the step with the best validation loss.
"""

import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from custom_llm.cli import (ArgumentParser, Question, UserError, add_question_flags, ask,
                            atomic_path, existing_file, positive_float, positive_int, run)
from custom_llm.data import get_batch, read_text, split
from custom_llm.default_text import build_default_text
from custom_llm.tokenizer import build_char_tokenizer, encode_to_array, save_tokenizer
from llm_model import GPTLanguageModel, load_config, save_config

DEFAULT_TEXT = "input.txt"
QUESTIONS = [
    Question("batch_size", "Batch size", 32, positive_int),
    Question("learning_rate", "Learning rate", 0.0003, positive_float),
    Question("max_epochs", "Number of epochs", 5, positive_int),
    Question("dataset_path", "Path to your text file", DEFAULT_TEXT, existing_file),
]


def learning_rate_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model, learning_rate: float, weight_decay: float, device: str):
    """AdamW; weight decay on matrices only (not on biases, LayerNorms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.99), fused=(device == "cuda"))


@torch.no_grad()
def estimate_loss(model, tokens, batch_size, block_size, batches, device, autocast):
    """Mean loss over a fixed set of windows, so evaluations are comparable step to step."""
    model.eval()
    generator = np.random.default_rng(1234)
    losses = []
    for _ in range(batches):
        x, y = get_batch(tokens, batch_size, block_size, generator, device)
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


def main():
    parser = ArgumentParser(description="Train your GPT on a text file.")
    add_question_flags(parser, QUESTIONS)
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (quick trials)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--config_path", default="model_config.pth")
    parser.add_argument("--output", default="trained_model.pth", help="where to save the trained weights")
    parser.add_argument("--tokenizer_path", default="tokenizer.json")
    parser.add_argument("--encoding", default="utf-8", help="the text file's encoding")
    parser.add_argument("--eval_interval", type=int, default=None,
                        help="steps between validation runs (default: 4 per epoch)")
    parser.add_argument("--eval_batches", type=int, default=20, help="batches per validation run")
    parser.add_argument("--warmup_steps", type=int, default=None, help="default: 5%% of the steps, at most 200")
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--grad_clip", type=float, default=1.0)
    args = parser.parse_args()
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max_steps: {args.max_steps} must be a positive whole number", 2)

    # Ask, load.
    config = load_config(args.config_path)
    plan = ask("Configure training parameters:", QUESTIONS, args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    if plan["dataset_path"] == DEFAULT_TEXT and not os.path.exists(DEFAULT_TEXT):
        n_chars = build_default_text(DEFAULT_TEXT)
        print(f"No {DEFAULT_TEXT} here, so one was made for you: {n_chars:,} characters of Python's "
              "own documentation. Give --dataset_path to train on your text.")
    text = read_text(plan["dataset_path"], args.encoding)

    # Tokenizer: one token per distinct character, saved beside the config.
    tokenizer = build_char_tokenizer(set(text))
    tokens = encode_to_array(tokenizer, text)
    block_size = config["block_size"]
    train_tokens, val_tokens = split(tokens, block_size, plan["dataset_path"])
    save_tokenizer(tokenizer, args.tokenizer_path)
    config["vocab_size"] = tokenizer.get_vocab_size()
    config["dataset_path"] = os.path.abspath(plan["dataset_path"])
    save_config(config, args.config_path)
    print(f"Tokenizer: {len(set(text))} distinct characters, vocabulary of {config['vocab_size']} "
          f"(with byte fallback) saved to {args.tokenizer_path}")
    print(f"Text: {len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens")

    # Model and plan.
    model = GPTLanguageModel(config).to(device)
    batch_size = plan["batch_size"]
    tokens_per_step = batch_size * block_size
    steps_per_epoch = max(1, math.ceil(len(train_tokens) / tokens_per_step))
    total_steps = plan["max_epochs"] * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else min(200, max(1, total_steps // 20))
    eval_interval = args.eval_interval or max(1, steps_per_epoch // 4)
    optimizer = make_optimizer(model, plan["learning_rate"], args.weight_decay, device)
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)

    print(f"Training on {device} with {model.num_parameters() / 1e6:.2f}M parameters "
          f"({n_epochs} epoch(s), {total_steps} steps of {tokens_per_step} tokens)")

    # Train.
    generator = np.random.default_rng(args.seed)
    best_val, best_step, step = float("inf"), None, 0
    started = time.time()
    for epoch in range(n_epochs):
        steps_this_epoch = min(steps_per_epoch, total_steps - step)
        progress = tqdm(range(steps_this_epoch), desc=f"Epoch {epoch + 1}/{n_epochs}",
                        unit="step", dynamic_ncols=True, leave=False,
                        disable=not sys.stderr.isatty())
        epoch_loss = 0.0
        for i in progress:
            lr = learning_rate_at(step, total_steps, plan["learning_rate"], warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(train_tokens, batch_size, block_size, generator, device)
            with autocast():
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            epoch_loss += loss.item()
            elapsed = time.time() - started
            progress.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{step * tokens_per_step / elapsed:,.0f}")

            if step % eval_interval == 0 or i == steps_this_epoch - 1:
                val_loss = estimate_loss(model, val_tokens, batch_size, block_size,
                                         args.eval_batches, device, autocast)
                if val_loss < best_val:
                    best_val, best_step = val_loss, step
                    with atomic_path(args.output) as tmp:
                        torch.save(model.state_dict(), tmp)
        progress.close()
        print(f"Epoch {epoch + 1}/{n_epochs}, Loss: {epoch_loss / max(1, steps_this_epoch):.4f}, "
              f"Validation loss: {val_loss:.4f} (best {best_val:.4f} at step {best_step})")

    elapsed = time.time() - started
    print(f"Saved {args.output}: weights from step {best_step} (validation loss {best_val:.4f}); "
          f"{step} steps in {elapsed:.1f}s, {step * tokens_per_step / elapsed:,.0f} tokens/s")


if __name__ == "__main__":
    run(main)
