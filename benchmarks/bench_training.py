"""Training benchmark: train_llm.py against nanoGPT's documented CPU recipe, side by side.

    python benchmarks/bench_training.py --nanogpt /path/to/nanoGPT-checkout
    python benchmarks/bench_training.py --skip_nanogpt --reference_seconds 106 -- --learning_rate 0.002
    python benchmarks/bench_training.py --nanogpt DIR --same_time    # train_llm.py --minutes: nanoGPT's time
    python benchmarks/bench_training.py --nanogpt DIR --architectures gpt2,windowed -- --minutes 10

Both train the same model (4 layers, 4 heads, n_embd 128, block_size 64, dropout 0; 0.8M
parameters) on the same text with the same 90/10 split, one after the other on this machine.
Printed: wall time (from process start) to validation loss 1.886, validation loss reached within
nanoGPT's total time, end-to-end training tokens/s, peak RSS, and the ratios.
With --architectures, train_llm.py trains one model of each architecture (llm_model.py
--architecture; `windowed:8` for rows of 8 windows), one after the other, with the same
arguments. The logged validation loss is over each model's training rows: a windowed model's
rows of several windows let most tokens see a whole window, GPT-2's rows of one window give a
token 0 to block_size - 1 before it. So each trained model is then read again on one footing,
the same EVAL_TOKENS held-out tokens for all (evaluate_footings):
  one block   rows of block_size tokens, as nanoGPT evaluates (the footing of 1.886 and 1.47);
  last block  every token with exactly its last block_size tokens (what a reader that slides a
              window, or a windowed model at any length, gives a token);
  one pass    windowed only: all the tokens in one pass, as llama.cpp reads a long text.
Arguments after `--` go to train_llm.py unchanged. With --same_time, train_llm.py gets only
`--minutes`, set so that its process ends when nanoGPT's did (its wall time less this script's
measure of train_llm.py's start-up and final save, STARTUP_SECONDS).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from custom_llm.precision import cpu_summary  # noqa: E402
DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
TARGET_LOSS = 1.886
EVAL_TOKENS = 8192  # held-out tokens each trained model is read again on (evaluate_footings)
STARTUP_SECONDS = 5.0  # train_llm.py's imports, token cache and model set-up before its first step
MODEL = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--dropout", "0"]
NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                  "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def run_timed(command, cwd, on_line=None):
    """Run a command; call on_line(seconds since start, line) for each stdout line. Returns
    (wall seconds, peak RSS bytes, return code, all output)."""
    started = time.time()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, bufsize=1)
    output = []
    for line in process.stdout:
        output.append(line)
        if on_line:
            on_line(time.time() - started, line)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.time() - started, usage.ru_maxrss * 1024, process.returncode, "".join(output)


def run_nanogpt(checkout, text, workdir):
    folder = os.path.join(workdir, "nanogpt")
    shutil.copytree(checkout, folder, ignore=shutil.ignore_patterns(".git"))
    shutil.copy(text, os.path.join(folder, "data", "shakespeare_char", "input.txt"))
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=folder, check=True,
                   capture_output=True)
    evals = []  # (seconds, step, val loss)

    def on_line(seconds, line):
        match = re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line)
        if match:
            evals.append((seconds, int(match.group(1)), float(match.group(2))))

    wall, rss, code, output = run_timed([sys.executable, "train.py", *NANOGPT_RECIPE], folder, on_line)
    if code != 0:
        raise SystemExit(f"nanoGPT failed:\n{output[-2000:]}")
    return {"wall": wall, "rss": rss, "evals": evals, "tokens": 2000 * 12 * 64}


def run_ours(text, workdir, extra, name="gpt2"):
    """name: an architecture, or windowed:N for rows of N windows."""
    folder = os.path.join(workdir, f"ours-{name.replace(':', '-')}")
    os.makedirs(folder)
    architecture, _, windows = name.partition(":")
    shape = [*MODEL, "--architecture", architecture, *(["--train_windows", windows] if windows else [])]
    subprocess.run([sys.executable, os.path.join(REPO, "llm_model.py"), *shape, "-y"], cwd=folder, check=True,
                   capture_output=True)
    started = time.time()
    wall, rss, code, output = run_timed([sys.executable, os.path.join(REPO, "train_llm.py"),
                                         "--dataset_path", text, "-y", *extra], folder)
    if code != 0:
        raise SystemExit(f"train_llm.py failed:\n{output[-2000:]}")
    with open(os.path.join(folder, "training_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [(row["time"] - started, row["step"], row["val_loss"]) for row in rows]
    match = re.search(r"(\d+) steps in ([\d.]+)s[^,]*, ([\d,]+) tokens/s", output)
    return {"wall": wall, "rss": rss, "evals": evals, "tokens": rows[-1]["tokens"],
            "loop_tokens_per_s": float(match.group(3).replace(",", "")) if match else None,
            "summary": [line for line in output.splitlines() if line.startswith(("Training on", "Saved"))],
            "footings": evaluate_footings(folder)}


def evaluate_footings(folder: str) -> dict:
    """The trained model in folder read again on held-out tokens: mean loss on each footing of
    the module's docstring ('one pass' for a windowed model only), of the same targets: up to
    EVAL_TOKENS tokens, each with at least a block before it."""
    import torch
    from torch.nn import functional as F
    from custom_llm.architectures import sequence_length
    from custom_llm.checks import held_out_tokens
    from custom_llm.files import load_config, load_trained_model
    from custom_llm.tokenizer import load_tokenizer

    config = load_config(os.path.join(folder, "model_config.pth"))
    model = load_trained_model(os.path.join(folder, "trained_model.pth"), config)
    held_out = held_out_tokens(None, config, load_tokenizer(os.path.join(folder, "tokenizer.json")))
    tokens, block = torch.tensor(held_out.tokens), config["block_size"]
    n = min(EVAL_TOKENS, len(tokens) - block - 1) // block * block
    targets = tokens[block:block + n]            # target i follows input block - 1 + i

    def loss_of(inputs, which, rows_at_once=256):
        """Mean loss of the targets, from inputs (rows) and which (a slice) of each row's logits."""
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(inputs), rows_at_once):
                logits = model(inputs[start:start + rows_at_once])[0][:, which].reshape(-1, model.config["vocab_size"])
                row_targets = targets.view(len(inputs), -1)[start:start + rows_at_once].reshape(-1)
                total += F.cross_entropy(logits.float(), row_targets, reduction="sum").item()
        return total / n

    found = {"one block": loss_of(tokens[block - 1:block - 1 + n].view(-1, block), slice(None)),
             "last block": loss_of(tokens[:block + n - 1].unfold(0, block, 1), slice(-1, None))}
    if sequence_length(config) > block:
        found["one pass"] = loss_of(tokens[None, :block + n - 1], slice(block - 1, None), rows_at_once=1)
    return found


def time_to(evals, target):
    return next((seconds for seconds, _, loss in evals if loss <= target), None)


def loss_within(evals, seconds):
    reached = [loss for t, _, loss in evals if t <= seconds]
    return min(reached) if reached else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--nanogpt", help="a nanoGPT checkout (not part of this repo)")
    parser.add_argument("--skip_nanogpt", action="store_true")
    parser.add_argument("--reference_seconds", type=float, default=106.0,
                        help="nanoGPT's time when it is not run here")
    parser.add_argument("--architectures", default="gpt2",
                        help="comma-separated: train one model of each with train_llm.py (default: %(default)s)")
    parser.add_argument("--same_time", action="store_true",
                        help="give train_llm.py --minutes matching nanoGPT's (or --reference_seconds) wall time")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    workdir = tempfile.mkdtemp(prefix="bench-training-")
    try:
        print(f"CPU: {cpu_summary()}\ntext: {args.text}")
        nano = None
        if not args.skip_nanogpt:
            if not args.nanogpt:
                raise SystemExit("give --nanogpt DIR (a nanoGPT checkout) or --skip_nanogpt")
            nano = run_nanogpt(args.nanogpt, args.text, workdir)
        reference = nano["wall"] if nano else args.reference_seconds
        if args.same_time:
            extra = ["--minutes", f"{(reference - STARTUP_SECONDS) / 60:.3f}", *extra]
            print(f"train_llm.py {' '.join(extra)}")
        runs = {name: run_ours(args.text, workdir, extra, name) for name in args.architectures.split(",")}
        ours = next(iter(runs.values()))

        rows = [("nanoGPT", nano)] if nano else []
        rows += [(f"ours {name}" if len(runs) > 1 else "train_llm.py", run) for name, run in runs.items()]
        print(f"\n{'':14}{'wall s':>8}{'to ' + str(TARGET_LOSS):>10}{'best val':>10}{'val @ ref':>11}"
              f"{'tokens/s':>10}{'peak RSS':>10}")
        for name, r in rows:
            t = time_to(r["evals"], TARGET_LOSS)
            print(f"{name:14}{r['wall']:8.1f}{(f'{t:.1f}' if t else '-'):>10}"
                  f"{min(l for _, _, l in r['evals']):10.4f}{fmt(loss_within(r['evals'], reference)):>11}"
                  f"{r['tokens'] / r['wall']:10,.0f}{r['rss'] / 2**20:9.0f}M")
        print(f"\nheld-out loss of the trained models, on one footing each column ({EVAL_TOKENS:,} tokens at most):")
        print(f"{'':18}{'one block':>11}{'last block':>12}{'one pass':>10}")
        for name, run in runs.items():
            footing = run["footings"]
            print(f"{name:18}" + "".join(f"{fmt(footing.get(column)):>{width}}" for column, width in
                                         (("one block", 11), ("last block", 12), ("one pass", 10))))
        t_ours = time_to(ours["evals"], TARGET_LOSS)
        t_ref = time_to(nano["evals"], TARGET_LOSS) if nano else reference
        print(f"\nreference time (nanoGPT's total): {reference:.1f}s")
        if t_ours and t_ref:
            print(f"time to {TARGET_LOSS}: {t_ours:.1f}s vs {t_ref:.1f}s = {t_ours / t_ref:.2f}x (goal <= 0.5x of nanoGPT's total: "
                  f"{t_ours / reference:.2f}x)")
        print(f"validation loss within the reference time: {fmt(loss_within(ours['evals'], reference))} (goal <= 1.75)")
        if nano:
            print(f"end-to-end tokens/s: {ours['tokens'] / ours['wall']:,.0f} vs {nano['tokens'] / nano['wall']:,.0f} = "
                  f"{(ours['tokens'] / ours['wall']) / (nano['tokens'] / nano['wall']):.2f}x (goal >= 1.5x)")
        print(f"train_llm.py training-loop tokens/s: {ours['loop_tokens_per_s']:,.0f}")
        for name, run in runs.items():
            for line in run["summary"]:
                print(f"  {name}: {line}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fmt(value):
    return f"{value:.4f}" if value is not None else "-"


if __name__ == "__main__":
    main()
