"""Fine-tuning speed at GPT-2's size: this project's model against transformers' GPT2LMHeadModel.

    python benchmarks/bench_gpt2_speed.py                 # bf16 autocast and float32, 3 timed steps each
    python benchmarks/bench_gpt2_speed.py --rounds 2      # each run twice, for a steadier figure

Both models have GPT-2's 124M shape (12 layers, n_embd 768, 12 heads, 1024 positions, 50,257
tokens) with random weights, so nothing is downloaded: the GPT-2 model as `train_llm.py
--init_from gpt2` trains it (its head untied: 163M parameters trained) and
transformers.GPT2LMHeadModel(GPT2Config()) (head tied to the embedding: 124M). The same training
step for both (bench_step.py's: random tokens, forward under the autocast, backward, clipping,
AdamW), the same batch of 1024-token windows, dropout off in both (GPT-2's attention dropout would
move transformers off the fused attention kernel). The runs alternate, ours and theirs, one model
in memory at a time, each timed after a warm-up step, so the ratio holds on a busy machine even
where the absolute figures do not. Printed: the CPU, versions, load, tokens/s and the ratio.
"""

import argparse
import gc
import os
import statistics
import sys

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_step import MODELS, seconds_per_step, seconds_per_training_step  # noqa: E402
from custom_llm.model import build_model  # noqa: E402
from custom_llm.precision import cpu_summary  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY, BETAS = 0.01, 0.1, (0.9, 0.99)  # as bench_step.py gives make_optimizer


def transformers_config(dropout):
    return GPT2Config(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def seconds_ours(config, batch_size, bf16, steps, warmup):
    return seconds_per_step(config, batch_size, "adamw", bf16, torch.float32, steps, warmup)


def seconds_transformers(dropout, batch_size, bf16, steps, warmup):
    """transformers' model in a plain PyTorch loop: AdamW with weight decay on matrices only, as ours."""
    torch.manual_seed(0)
    config = transformers_config(dropout)
    model = GPT2LMHeadModel(config).train()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                   {"params": vectors, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=BETAS)
    x = torch.randint(0, config.vocab_size, (batch_size, config.n_positions))
    return seconds_per_training_step(lambda: model(input_ids=x, labels=x).loss, model, optimizer, bf16,
                                     steps, warmup)


def parameters(build):
    with torch.device("meta"):  # counted without allocating
        return sum(p.numel() for p in build().parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=1, help="windows of 1024 tokens per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each model per precision")
    parser.add_argument("--precision", choices=["both", "bfloat16", "float32"], default="both")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # its notes on the random config are not the figures
    config = dict(MODELS["gpt2"], dropout=args.dropout)
    tokens = args.batch_size * config["block_size"]
    print(f"CPU: {cpu_summary()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"GPT-2 shape, random weights: ours {parameters(lambda: build_model(config)) / 1e6:.0f}M "
          f"parameters, transformers' {parameters(lambda: GPT2LMHeadModel(transformers_config(args.dropout))) / 1e6:.0f}M; "
          f"batch {args.batch_size} x {config['block_size']} tokens, AdamW, {args.steps} timed steps per run\n")

    runners = {"ours": lambda bf16: seconds_ours(config, args.batch_size, bf16, args.steps, warmup=1),
               "transformers": lambda bf16: seconds_transformers(args.dropout, args.batch_size, bf16,
                                                                 args.steps, warmup=1)}
    precisions = [p for p in ("bfloat16", "float32") if args.precision in ("both", p)]
    rates = {(p, name): [] for p in precisions for name in runners}
    order = list(runners)
    for _ in range(args.rounds):
        for precision in precisions:
            for name in order:
                seconds = runners[name](precision == "bfloat16")
                rates[precision, name].append(tokens / seconds)
                print(f"  {precision:8} {name:12} {tokens / seconds:7.1f} tokens/s", flush=True)
                gc.collect()  # one model in memory at a time
            order.reverse()  # ours first, then theirs first: drift in the machine's load falls on both

    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    print("| precision | ours, tokens/s | transformers, tokens/s | ours / transformers |\n|---|---:|---:|---:|")
    for precision in precisions:
        ours, theirs = (statistics.median(rates[precision, name]) for name in runners)
        label = "bf16 autocast" if precision == "bfloat16" else "float32"
        print(f"| {label} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |")
    if args.rounds > 1:
        print("(medians of the runs above)")


if __name__ == "__main__":
    main()
