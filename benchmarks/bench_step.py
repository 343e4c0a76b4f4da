"""Per-step training speed under each precision and optimizer option, on this CPU.

    python benchmarks/bench_step.py                     # the benchmark model (0.8M) at batch 128
    python benchmarks/bench_step.py --model default     # llm_model.py's default shape (4.9M)
    python benchmarks/bench_step.py --model gpt2 --batch_size 1 --steps 2 --optimizer adamw   # fine-tuning GPT-2
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_step.py   # a plain AVX2 CPU

One training step (forward, backward, clipping, optimizer) on random tokens, timed after a
warm-up; every option runs in this one process, one after the other, so the ratios compare like
with like. Printed: the CPU, what `--dtype auto` picks here and why, tokens/s per option and its
ratio to float32 AdamW, the cost of Muon over AdamW in each precision, and the attention kernel
alone in both precisions (why the model keeps CPU attention in float32).
"""

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from custom_llm.model import build_model  # noqa: E402
from custom_llm.optimizer import make_optimizer  # noqa: E402
from custom_llm.precision import choose_precision, cpu_summary  # noqa: E402

MODELS = {
    "bench": {"vocab_size": 65, "n_embd": 128, "n_head": 4, "n_layer": 4, "block_size": 64, "dropout": 0.0},
    "default": {"vocab_size": 100, "n_embd": 256, "n_head": 8, "n_layer": 6, "block_size": 128, "dropout": 0.0},
    # GPT-2 (124M, here 163M: its head is untied) as train_llm.py --init_from fine-tunes it.
    "gpt2": {"vocab_size": 50257, "n_embd": 768, "n_head": 12, "n_layer": 12, "block_size": 1024, "dropout": 0.0},
}


def seconds_per_step(config, batch_size, optimizer_kind, bf16, orthogonalize_dtype, steps, warmup, torch_muon=False):
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = make_optimizer(model, 0.01, 0.1, "cpu", optimizer_kind, orthogonalize_dtype)
    if torch_muon:  # torch.optim.Muon itself, which always orthogonalizes in bfloat16
        blocks = [p for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("h.")]
        optimizer.optimizers = (torch.optim.Muon(blocks, lr=0.01, adjust_lr_fn="match_rms_adamw"),
                                optimizer.optimizers[1])
    x = torch.randint(0, config["vocab_size"], (batch_size, config["block_size"]))
    return seconds_per_training_step(lambda: model(x, x)[1], model, optimizer, bf16, steps, warmup)


def seconds_per_training_step(loss_of_batch, model, optimizer, bf16, steps, warmup):
    """Mean seconds of one step (forward under the chosen autocast, backward, clipping at 1.0,
    optimizer), timed after `warmup` untimed steps. Any model: loss_of_batch returns its loss."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        with autocast():
            loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def attention_milliseconds(batch_size, config, dtype, repeats=10):
    head_dim = config["n_embd"] // config["n_head"]
    q, k, v = (torch.randn(batch_size, config["n_head"], config["block_size"], head_dim, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    for _ in range(2):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    started = time.perf_counter()
    for _ in range(repeats):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return (time.perf_counter() - started) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="bench")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per option (default: 20, or 5 "
                                                                "for the default model)")
    parser.add_argument("--precision", choices=["both", "float32", "bfloat16"], default="both",
                        help="time only these rows (bfloat16 is very slow where it is emulated)")
    parser.add_argument("--optimizer", choices=["both", "adamw", "muon"], default="both",
                        help="time only these rows (fine-tuning uses AdamW)")
    parser.add_argument("--torch_muon", action="store_true",
                        help="also time torch.optim.Muon (bfloat16 orthogonalization) under float32")
    args = parser.parse_args()
    config = MODELS[args.model]
    steps = args.steps or (20 if args.model == "bench" else 5)
    tokens = args.batch_size * config["block_size"]
    print(f"CPU: {cpu_summary()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; --dtype auto picks "
          f"{choose_precision('auto', 'cpu').describe()}")
    print(f"model {args.model} (n_layer {config['n_layer']}, n_embd {config['n_embd']}, block_size "
          f"{config['block_size']}), batch {args.batch_size} x {config['block_size']} tokens, {steps} timed steps\n")
    print("| option | tokens/s | vs float32 AdamW |\n|---|---:|---:|")
    options = [("float32, AdamW", "adamw", False, torch.float32),
               ("float32, Muon (float32 orthogonalization)", "muon", False, torch.float32),
               ("bf16 autocast, AdamW", "adamw", True, torch.bfloat16),
               ("bf16 autocast, Muon (bfloat16 orthogonalization)", "muon", True, torch.bfloat16)]
    options = [o for o in options if args.precision in ("both", "bfloat16" if o[2] else "float32")
               and args.optimizer in ("both", o[1])]
    seconds = {}
    for name, kind, bf16, ortho in options:
        seconds[name] = seconds_per_step(config, args.batch_size, kind, bf16, ortho, steps, warmup=2)
    if args.torch_muon:
        name = "float32, torch.optim.Muon (bfloat16 orthogonalization)"
        seconds[name] = seconds_per_step(config, args.batch_size, "muon", False, torch.float32, steps, 2, True)
    baseline = seconds.get("float32, AdamW")
    for name, s in seconds.items():
        print(f"| {name} | {tokens / s:,.0f} | " + (f"{baseline / s:.2f}x |" if baseline else " |"))
    for precision in ("float32", "bf16 autocast"):
        adamw, muon = (next((n for n in seconds if n.startswith(f"{precision}, {kind}")), None) for kind in ("AdamW", "Muon"))
        if adamw and muon:
            print(f"Muon step over AdamW step, {precision}: {100 * (seconds[muon] / seconds[adamw] - 1):+.1f}%")
    fp32, bf16 = (attention_milliseconds(args.batch_size, config, dtype) for dtype in (torch.float32, torch.bfloat16))
    print(f"attention alone, forward + backward per layer: float32 {fp32:.2f} ms, bfloat16 {bf16:.2f} ms "
          f"({bf16 / fp32:.1f}x)")


if __name__ == "__main__":
    main()
