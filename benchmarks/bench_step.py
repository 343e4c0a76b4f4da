"""Per-step training speed of the benchmark model under each option train_llm.py can use.

    python benchmarks/bench_step.py                 # 4 layers, 4 heads, n_embd 128, block 64
    python benchmarks/bench_step.py --batch_size 64 --compile

One training step (forward, backward, clipping, optimizer) on random tokens, timed after a
warm-up; every option runs in this one process, one after the other, so the ratios compare like
with like. Printed: tokens/s per option and its ratio to float32 with AdamW, then the attention
kernel alone in float32 and bfloat16 (why the model keeps CPU attention in float32).
"""

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from custom_llm.training import cpu_has_amx, make_optimizer  # noqa: E402
from custom_llm.model import GPTLanguageModel  # noqa: E402


def tokens_per_second(config, batch_size, optimizer_kind, bf16, compiled, steps, warmup):
    torch.manual_seed(0)
    model = GPTLanguageModel(config)
    optimizer = make_optimizer(model, 0.01, 0.1, "cpu", optimizer_kind)
    train_model = torch.compile(model) if compiled else model
    x = torch.randint(0, config["vocab_size"], (batch_size, config["block_size"]))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        with autocast():
            _, loss = train_model(x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * config["block_size"] * steps / (time.perf_counter() - started), warmup_seconds


def attention_milliseconds(batch_size, config, dtype, repeats=30):
    head_dim = config["n_embd"] // config["n_head"]
    q, k, v = (torch.randn(batch_size, config["n_head"], config["block_size"], head_dim, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    started = time.perf_counter()
    for _ in range(repeats):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return (time.perf_counter() - started) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to start)")
    args = parser.parse_args()
    config = {"vocab_size": 65, "n_embd": 128, "n_head": 4, "n_layer": 4, "block_size": 64, "dropout": 0.0}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX: {cpu_has_amx()}; "
          f"batch {args.batch_size} x {config['block_size']} tokens")

    options = [("float32, AdamW", "adamw", False, False), ("float32, Muon", "muon", False, False),
               ("bf16 autocast, AdamW", "adamw", True, False), ("bf16 autocast, Muon", "muon", True, False)]
    if args.compile:
        options += [("bf16 autocast, Muon, compiled", "muon", True, True)]
    baseline = None
    for name, kind, bf16, compiled in options:
        rate, warmup_seconds = tokens_per_second(config, args.batch_size, kind, bf16, compiled, args.steps,
                                                 warmup=5)
        baseline = baseline or rate
        print(f"  {name:32} {rate:9,.0f} tokens/s  {rate / baseline:5.2f}x"
              + (f"  (first 5 steps, with compiling: {warmup_seconds:.1f}s)" if compiled else ""))
    fp32, bf16 = (attention_milliseconds(args.batch_size, config, dtype) for dtype in (torch.float32, torch.bfloat16))
    print(f"  attention alone, forward + backward per layer: float32 {fp32:.2f} ms, bfloat16 {bf16:.2f} ms "
          f"({bf16 / fp32:.1f}x)")


if __name__ == "__main__":
    main()
