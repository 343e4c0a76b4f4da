"""Resume equality on the default recipe: a run stopped with Ctrl-C at a random moment and then
resumed must end with the weights of a run that was never stopped.

    python benchmarks/check_resume.py                          # default shape and flags, 10 runs
    python benchmarks/check_resume.py --dtype float32 --shape "--n_embd 128 --n_head 4 --n_layer 4 --block_size 64"
    python benchmarks/check_resume.py --torchrun               # 2 processes against --grad_accum_steps 2

Each run trains the same plan (default model shape and training flags, --max_steps on the text,
a validation line in the log after every step) in a fresh folder, sends SIGINT once the log shows
a random step, resumes with --resume and compares the final weights and the log with those of an
uninterrupted reference run. Prints the maximum weight difference of each run, and of a second
uninterrupted run (the noise floor).
"""

import argparse
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from custom_llm.precision import cpu_summary  # noqa: E402

print = functools.partial(print, flush=True)  # progress shows in a log file too
DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


def script(name):
    return [sys.executable, os.path.join(REPO, name)]


def configure(folder, shape):
    os.makedirs(folder)
    subprocess.run(script("llm_model.py") + ["-y", *shape], cwd=folder, check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)


def train(folder, plan, *extra, processes=1, env=None):
    command = script("train_llm.py")
    if processes > 1:
        command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                   f"--nproc_per_node={processes}"] + command[1:]
    result = subprocess.run(command + ["-y", *plan, *extra], cwd=folder, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"training failed in {folder}:\n{result.stderr[-2000:]}")
    return result


def interrupted(folder, plan, step):
    """Start the run and SIGINT it once it has logged `step` steps (a log line per step); returns
    the step its checkpoint holds, or None when it ended before the signal."""
    process = subprocess.Popen(script("train_llm.py") + ["-y", *plan], cwd=folder, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(folder, "training_log.jsonl")
    while process.poll() is None:
        if os.path.exists(log) and log_lines(log) >= step:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    process.wait(timeout=600)
    if process.returncode != 130:
        return None
    return torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=True)["step"]


def log_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def weights(folder):
    return torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=True)["model"]


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def log_rows(folder):
    with open(os.path.join(folder, "training_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_val_loss(folder):
    return log_rows(folder)[-1]["val_loss"]


def compare_processes(root, shape, plan):
    """2 processes under torchrun against 1 process with --grad_accum_steps 2 (the same windows in
    the same order), and the 1 process again with one thread, as each of the 2 processes has."""
    runs = {"1 process, 2 threads, --grad_accum_steps 2": (1, ["--grad_accum_steps", "2"], {}),
            "1 process, 1 thread, --grad_accum_steps 2": (1, ["--grad_accum_steps", "2"], {"LOCAL_WORLD_SIZE": "2"}),
            "2 processes (torchrun), 1 thread each": (2, [], {})}
    results = {}
    for name, (processes, extra, env) in runs.items():
        folder = os.path.join(root, f"p{len(results)}")
        configure(folder, shape)
        train(folder, plan, *extra, processes=processes, env=env)
        results[name] = (weights(folder), final_val_loss(folder))
        print(f"{name}: final validation loss {results[name][1]:.5f}")
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            print(f"{a}  vs  {b}: max weight difference {max_difference(results[a][0], results[b][0]):.3g}, "
                  f"validation loss difference {abs(results[a][1] - results[b][1]):.2g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--shape", default="", help="llm_model.py flags; default: its default shape")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--seed", type=int, default=0, help="for the moments of interruption")
    parser.add_argument("--torchrun", action="store_true", help="compare processes instead of resuming")
    args = parser.parse_args()
    random.seed(args.seed)
    shape = args.shape.split()
    plan = ["--dataset_path", os.path.abspath(args.text), "--max_steps", str(args.max_steps),
            "--eval_interval", "1", "--eval_batches", "1", "--dtype", args.dtype]  # a log line per step
    root = tempfile.mkdtemp(prefix="check-resume-")
    print(f"CPU: {cpu_summary()}\nplan: {' '.join(plan)}  shape: {args.shape or 'default'}\n")
    try:
        if args.torchrun:
            return compare_processes(root, shape, plan)
        configure(os.path.join(root, "reference"), shape)
        reference = train(os.path.join(root, "reference"), plan)
        print(next(line for line in reference.stdout.splitlines() if line.startswith("Precision")))
        configure(os.path.join(root, "again"), shape)
        train(os.path.join(root, "again"), plan)
        expected, expected_log = weights(os.path.join(root, "reference")), log_rows(os.path.join(root, "reference"))
        print(f"uninterrupted run twice: max weight difference "
              f"{max_difference(expected, weights(os.path.join(root, 'again'))):.3g}")
        differences = []
        for run in range(args.runs):
            folder = os.path.join(root, f"run{run}")
            configure(folder, shape)
            step = interrupted(folder, plan, random.randint(1, args.max_steps - 1))
            if step is None:
                print(f"run {run + 1}: finished before the signal; not counted")
                continue
            train(folder, plan, "--resume")
            difference = max_difference(expected, weights(folder))
            rows = log_rows(folder)
            same_log = [r["step"] for r in rows] == [r["step"] for r in expected_log] and all(
                abs(r["val_loss"] - e["val_loss"]) < 1e-4 for r, e in zip(rows, expected_log))
            differences.append(difference)
            print(f"run {run + 1}: stopped at step {step}/{args.max_steps}, resumed: max weight difference "
                  f"{difference:.3g}; log {'the same' if same_log else 'DIFFERS'}", flush=True)
            shutil.rmtree(folder)
        print(f"\n{len(differences)} runs: max weight difference {max(differences):.3g} "
              f"({sum(d == 0 for d in differences)} exactly equal)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
