"""How fast each way of running the model generates, one after the other in one run.

    python benchmarks/bench_generation.py --workdir DIR   # a folder where the pipeline ran
    python benchmarks/bench_generation.py                 # trains a default-size model briefly first
    python benchmarks/bench_generation.py --architecture windowed   # the same, a windowed model

Greedy generation of the same tokens from the same prompt, timed for:
  transformers generate()   the exported hf_model/, KV cache on (what a user would otherwise run)
  PyTorch generate()        the model's own generate() (custom_llm/model.py), with its KV cache
  bare llama.cpp loop       Llama.eval one token at a time, no sampling, no text: the ceiling
  bare llama_decode loop    the same through llama_decode and one reused batch (inference's path)
  inference_gguf            the script's own path (custom_llm.sampling.stream: sampling,
                            detokenizing, streaming the text), at F32, F16, Q8_0 and Q4_0
"In context" generates until the window is full (block_size tokens); "past context" goes on
for several windows, following the context rule (the older half is dropped when full and the
kept half re-read), and counts only the tokens after the first shift. Each figure is the
median of --repeats runs; TTFT is the time to the first new token (prompt evaluation included).

With --architecture windowed the model trained is a windowed one (docs/windowed.md): nothing
slides, every new token is one decode however far past the block, so "past context" is simply
the tokens after the first block_size positions. The bare loops (which slide as GPT-2 does) are
left out; PyTorch and inference_gguf are timed as above.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from custom_llm.context import slide  # noqa: E402
from custom_llm.export import quantize_atomic, write_gguf_atomic  # noqa: E402
from custom_llm.files import load_config, load_trained_model  # noqa: E402
from custom_llm.sampling import Sampler, Settings, stream  # noqa: E402
from custom_llm.runtime import GGUFModel  # noqa: E402
from custom_llm.tokenizer import encode, load_tokenizer  # noqa: E402

DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
TYPES = ["F32", "F16", "Q8_0", "Q4_0"]


# ------------------------------------------------------------------------------ set up

def prepare(args) -> str:
    """A folder with a trained model, its exports, and a GGUF of every type timed here."""
    folder = args.workdir or tempfile.mkdtemp(prefix="bench-generation-")
    py = sys.executable

    def stage(*cmd):
        print(f"$ {' '.join(map(str, cmd))}", flush=True)
        subprocess.run([py, *map(str, cmd)], cwd=folder, check=True, stdout=subprocess.DEVNULL)

    if not os.path.exists(os.path.join(folder, "trained_model.pth")):
        stage(os.path.join(REPO, "llm_model.py"), "-y", "--dropout", "0",   # the default size
              "--architecture", args.architecture)
        stage(os.path.join(REPO, "train_llm.py"), "-y", "--dataset_path", os.path.abspath(args.text),
              "--max_steps", args.train_steps, "--learning_rate", "0.001")
    if not os.path.isdir(os.path.join(folder, "hf_model")):
        stage(os.path.join(REPO, "convert_to_gguf.py"))
    config = load_config(os.path.join(folder, "model_config.pth"))
    model = load_trained_model(os.path.join(folder, "trained_model.pth"), config)
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    source = os.path.join(folder, "bench.F32.gguf")
    if not os.path.exists(source):
        write_gguf_atomic(model, tokenizer, source, "F32")
    for kind in TYPES[1:]:
        path = os.path.join(folder, f"bench.{kind}.gguf")
        if not os.path.exists(path):
            quantize_atomic(source, path, kind)
    return folder


# ---------------------------------------------------------------------------- timings

class Timing:
    """Timestamps of one generation: start, then one per new token."""

    def __init__(self, block_size, n_prompt):
        self.block_size, self.n_prompt = block_size, n_prompt
        self.start = time.perf_counter()
        self.stamps = []

    def token(self):
        self.stamps.append(time.perf_counter())

    @property
    def ttft(self):
        return self.stamps[0] - self.start

    def rate(self, first, last):
        """Tokens per second for new tokens first..last (0-based; token 0 ends with the TTFT)."""
        return (last - first) / (self.stamps[last] - self.stamps[first])

    def in_context(self):
        # New token i (0-based) is fed at position n_prompt + i; the window is full at block_size.
        return self.rate(0, min(len(self.stamps), self.block_size - self.n_prompt) - 1)

    def past_context(self):
        return self.rate(self.block_size - self.n_prompt, len(self.stamps) - 1)


def run_transformers(hf_model, prompt_ids, n_new, block_size):
    from transformers.generation.streamers import BaseStreamer

    timing = Timing(block_size, len(prompt_ids))

    class Stamps(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                timing.token()
            self.prompt_seen = True   # the first call is the prompt itself

        def end(self):
            pass

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new, min_new_tokens=n_new,
                                do_sample=False, use_cache=True, streamer=Stamps(),
                                pad_token_id=hf_model.config.eos_token_id)
    return timing, out[0, len(prompt_ids):].tolist()


def run_pytorch_rates(model, prompt_ids, n_in, n_long):
    """generate() has no per-token hook: TTFT, in-context and past-context tokens/s from the
    times of whole calls for 1, n_in and n_long tokens."""
    idx = torch.tensor([prompt_ids])
    times = {}
    for n in (1, n_in, n_long):
        start = time.perf_counter()
        model.generate(idx, n, temperature=0)
        times[n] = time.perf_counter() - start
    return times[1], (n_in - 1) / (times[n_in] - times[1]), (n_long - n_in) / (times[n_long] - times[n_in])


def run_bare_loop(gguf, prompt_ids, tokens, block_size):
    """Llama.eval, one token at a time, of the tokens generation produced; the context rule by
    Llama.reset + Llama.eval(kept half). No sampling, no logits read, no text."""
    llm = gguf.llm
    timing = Timing(block_size, len(prompt_ids))
    llm.reset()
    window = list(prompt_ids)
    llm.eval(window)
    for token in tokens:
        timing.token()
        grown = slide(window + [token], block_size)
        if len(grown) == len(window) + 1:
            llm.eval([token])
        else:
            llm.reset()
            llm.eval(grown)
        window = grown
    return timing


def run_bare_decode(gguf, prompt_ids, tokens, block_size):
    """The same loop one level lower: llama_decode on one reused batch (what GGUFModel.generate
    does), still without sampling or text. Shows what Llama.eval's own bookkeeping costs."""
    import llama_cpp
    timing = Timing(block_size, len(prompt_ids))
    window = list(prompt_ids)
    gguf._decode_window(window)
    batch, ctx = gguf._batch, gguf._ctx
    for token in tokens:
        timing.token()
        grown = slide(window + [token], block_size)
        if len(grown) == len(window) + 1:
            batch.n_tokens, batch.token[0], batch.pos[0], batch.logits[0] = 1, token, len(window), True
            llama_cpp.llama_decode(ctx, batch)
        else:
            gguf._decode_window(grown)
        window = grown
    return timing


class StampingSampler(Sampler):
    """The greedy sampler, noting the time as each token is chosen."""

    def __init__(self, settings, timing):
        super().__init__(settings)
        self.timing = timing

    def __call__(self, logits):
        token = super().__call__(logits)
        self.timing.token()
        return token


def run_inference(gguf, prompt, n_new, block_size, sink):
    """The script's own path: stream() with greedy settings, the text written as it comes."""
    settings = Settings(temperature=0, max_tokens=n_new)
    timing = Timing(block_size, len(gguf.tokenize(prompt)))

    def write(text):
        sink.write(text)
        sink.flush()

    result = stream(gguf, prompt, settings, StampingSampler(settings, timing), on_text=write)
    return timing, result.tokens


# ------------------------------------------------------------------------------- main

def median(values):
    return statistics.median(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a folder where the pipeline ran (default: train one briefly)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="training text when training here")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--windows", type=int, default=4, help="length of the past-context run, in windows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--architecture", choices=["gpt2", "windowed"], default="gpt2",
                        help="the model trained when training here (default: %(default)s)")
    args = parser.parse_args()

    folder = prepare(args)
    torch.set_num_threads(args.threads)
    config = load_config(os.path.join(folder, "model_config.pth"))
    block_size = config["block_size"]
    model = load_trained_model(os.path.join(folder, "trained_model.pth"), config)
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    prompt_ids = encode(tokenizer, args.prompt)
    n_in = block_size - len(prompt_ids)        # new tokens that fit in the context
    n_long = args.windows * block_size
    print(f"Model: {model.num_parameters() / 1e6:.2f}M parameters, n_embd {config['n_embd']}, "
          f"n_layer {config['n_layer']}, block_size {block_size}; {args.threads} threads; "
          f"prompt {args.prompt!r} ({len(prompt_ids)} tokens); {n_in} new tokens in context, "
          f"{n_long} past it; median of {args.repeats}", flush=True)

    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "hf_model"),
                                                    local_files_only=True).eval()
    rows, texts = [], {}
    sink = open(os.devnull, "w")

    # Each path runs once untimed first (warm-up: allocations, caches, lazy initialization).
    runs = [run_transformers(hf_model, prompt_ids, n_in, block_size) for _ in range(args.repeats + 1)][1:]
    texts["transformers"] = runs[0][1]
    rows.append(("transformers generate()", median(t.in_context() for t, _ in runs),
                 median(t.ttft for t, _ in runs), None))

    runs = [run_pytorch_rates(model, prompt_ids, n_in, n_long) for _ in range(args.repeats + 1)][1:]
    texts["pytorch"] = model.generate(torch.tensor([prompt_ids]), n_in, temperature=0)[0, len(prompt_ids):].tolist()
    rows.append(("PyTorch generate() (KV cache)", median(r[1] for r in runs), median(r[0] for r in runs),
                 median(r[2] for r in runs)))

    rows += gguf_rows(folder, args, prompt_ids, n_long, block_size, texts, n_in, sink)
    print_table(rows, texts, windowed=config.get("architecture") == "windowed")


def gguf_rows(folder, args, prompt_ids, n_long, block_size, texts, n_in, sink):
    """The GGUF paths of every type: inference_gguf, and (GPT-2) the bare loops."""
    rows = []
    for kind in TYPES:
        gguf = GGUFModel(os.path.join(folder, f"bench.{kind}.gguf"), n_threads=args.threads)
        inference = [run_inference(gguf, args.prompt, n_long, block_size, sink)
                     for _ in range(args.repeats + 1)][1:]
        tokens = inference[0][1]
        paths = [(f"inference_gguf {kind}", [t for t, _ in inference])]
        if not gguf.windowed:   # the bare loops slide as GPT-2 does
            paths = [(f"bare llama.cpp loop {kind}", [run_bare_loop(gguf, prompt_ids, tokens, block_size)
                                                      for _ in range(args.repeats + 1)][1:]),
                     (f"bare llama_decode loop {kind}", [run_bare_decode(gguf, prompt_ids, tokens, block_size)
                                                         for _ in range(args.repeats + 1)][1:])] + paths
        if kind == "F32":
            texts["F32"] = tokens[:n_in]
        for name, timings in paths:
            rows.append((name, median(t.in_context() for t in timings), median(t.ttft for t in timings),
                         median(t.past_context() for t in timings)))
    return rows


def print_table(rows, texts, windowed: bool):
    print("\n| path | tokens/s in context | TTFT ms | tokens/s past context | past / in |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, ttft, past in rows:
        past_cells = f"{past:.0f} | {past / rate:.0%}" if past else "n/a (positions end at block_size) | "
        print(f"| {name} | {rate:.0f} | {1000 * ttft:.1f} | {past_cells} |")

    by_name = {name: rate for name, rate, _, _ in rows}
    print()
    print(f"inference_gguf Q4_0 / transformers generate(): "
          f"{by_name['inference_gguf Q4_0'] / by_name['transformers generate()']:.2f}x (goal >= 4x)")
    for kind in TYPES if not windowed else []:
        print(f"inference_gguf {kind} / bare loop {kind}: "
              f"{by_name[f'inference_gguf {kind}'] / by_name[f'bare llama.cpp loop {kind}']:.0%} (goal >= 90%)")
    same = texts["transformers"] == texts["pytorch"] == texts["F32"]
    print(f"Greedy tokens equal across transformers, PyTorch and F32 GGUF: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
