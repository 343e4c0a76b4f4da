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

    python benchmarks/bench_generation.py --thread_choices A.gguf B.gguf   # llama.cpp's threads

times inference_gguf's path instead with 1 thread, 2 threads and the count the scripts choose
(custom_llm/resources.py choose_threads), on an idle machine and beside a training run: this
script starts train_llm.py (the demo model's shape, on --text) in a folder of its own, waits for
its steps to begin, and stops it when the timings are done (--train_minutes at most). Each
figure is the median of --repeats fresh loads each generating --tokens tokens, as
`inference_gguf.py --query` does, the three choices taking turns; the load column is the
1-minute load average after them.

With --architecture windowed the model trained is a windowed one (docs/windowed.md): nothing
slides, every new token is one decode however far past the block, so "past context" is simply
the tokens after the first block_size positions. The bare loops (which slide as GPT-2 does) are
left out; PyTorch and inference_gguf are timed as above.
"""

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from custom_llm.context import slide  # noqa: E402
from custom_llm.export import quantize_atomic, write_gguf_atomic  # noqa: E402
from custom_llm.files import load_config, load_trained_model  # noqa: E402
from custom_llm.precision import cpu_summary  # noqa: E402
from custom_llm.resources import busy_fraction, usable_cores, weight_bytes_per_token  # noqa: E402
from custom_llm.sampling import Sampler, Settings, stream  # noqa: E402
from custom_llm.runtime import GGUFModel  # noqa: E402
from custom_llm.tokenizer import encode, load_tokenizer  # noqa: E402

DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
TYPES = ["F32", "F16", "Q8_0", "Q4_0"]
DEMO_SHAPE = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--dropout", "0"]


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


# -------------------------------------------------------------------- thread choices

class TrainingRun:
    """train_llm.py in a folder of its own, the load of a user who trains one model while trying
    another: started on entering, once its steps have begun; stopped on leaving. It runs as from
    another terminal (setsid: Linux's autogroups share the CPUs between terminals before threads)."""

    def __init__(self, text: str, minutes: float):
        self.text, self.minutes = os.path.abspath(text), minutes

    def __enter__(self):
        self.folder = tempfile.mkdtemp(prefix="bench-threads-training-")
        py = sys.executable
        subprocess.run([py, os.path.join(REPO, "llm_model.py"), "-y", *DEMO_SHAPE], cwd=self.folder,
                       check=True, stdout=subprocess.DEVNULL)
        self.log_path = os.path.join(self.folder, "train.out")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([py, os.path.join(REPO, "train_llm.py"), "-y", "--minutes",
                                         str(self.minutes), "--dataset_path", self.text],
                                        cwd=self.folder, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while "steps fit in" not in self.output():   # printed as the timed steps begin
            if self.process.poll() is not None or time.time() > deadline:
                self.__exit__()
                raise SystemExit(f"the training run did not start its steps:\n{self.output()[-2000:]}")
            time.sleep(0.5)
        return self

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def check_running(self):
        if self.process.poll() is not None:
            raise SystemExit(f"the training run ended before the timings did: raise --train_minutes "
                             f"(it was {self.minutes})")

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return False


CHOICES = {"1": 1, "2": 2, "auto": None}   # None: the scripts' own choice


def load_and_generate(path, threads, args, sink):
    """One fresh load and one generation, as `inference_gguf.py --query` runs: (tokens/s, TTFT s,
    the threads llama.cpp ran). After a second's pause: beside other work, a generation started
    just after 2 spinning threads was up to a third slower (the scheduler has this process pay
    back the CPU time it took), and then the order of the choices would decide the figures."""
    time.sleep(1)
    gguf = GGUFModel(path, n_threads=threads)
    timing, _ = run_inference(gguf, args.prompt, args.tokens, gguf.block_size, sink)
    return timing.rate(0, len(timing.stamps) - 1), timing.ttft, gguf.threads


def time_choices(path, args, sink) -> dict:
    """{choice: (tokens/s, TTFT s, threads used, load average)}: medians of --repeats rounds after
    an untimed one, each round timing every choice in turn, so that other programs' work, which
    comes and goes, falls on all of them alike."""
    rounds = [{name: load_and_generate(path, threads, args, sink) for name, threads in CHOICES.items()}
              for _ in range(args.repeats + 1)][1:]
    load = os.getloadavg()[0]
    return {name: (median(r[name][0] for r in rounds), median(r[name][1] for r in rounds),
                   "/".join(str(n) for n in sorted({r[name][2] for r in rounds})), load) for name in CHOICES}


def others_cores(besides=None) -> float:
    """The cores' worth of CPU other programs used over the next second, the process `besides`
    (a psutil.Process: the training run) left out."""
    before = sum(besides.cpu_times()[:2]) if besides else 0.0
    busy = busy_fraction(1.0) * (os.cpu_count() or 1)
    return max(0.0, busy - (sum(besides.cpu_times()[:2]) - before if besides else 0.0))


def wait_for_quiet(seconds: float) -> None:
    """Wait, up to `seconds`, until other programs use less than a quarter of a core."""
    deadline = time.time() + seconds
    while others_cores() >= 0.25 and time.time() < deadline:
        pass


def thread_choices(args):
    sink = open(os.devnull, "w")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"CPU: {cpu_summary()}; {usable_cores()} cores for llama.cpp\ndate: {datetime.date.today()}; "
          f"commit {commit}; {args.tokens} new tokens from {args.prompt!r}, median of {args.repeats} "
          "fresh loads", flush=True)
    timed = {}
    for path in args.thread_choices:
        wait_for_quiet(args.quiet_wait)
        others = others_cores()
        timed[path, "idle"] = time_choices(path, args, sink)
        print(f"  idle: {path} timed (others used {others:.2f} cores before)", flush=True)
    wait_for_quiet(args.quiet_wait)
    with TrainingRun(args.text, args.train_minutes) as training:
        for path in args.thread_choices:
            others = others_cores(besides=psutil.Process(training.process.pid))
            timed[path, "training"] = time_choices(path, args, sink)
            training.check_running()
            print(f"  beside training: {path} timed (programs other than the training run used "
                  f"{others:.2f} cores before)", flush=True)

    print("\n| model | weights per token | threads | idle: tokens/s | TTFT ms | load | beside training: "
          "tokens/s | TTFT ms | load | training / idle |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in args.thread_choices:
        size = f"{weight_bytes_per_token(path) / 1e6:.1f} MB"
        for name in CHOICES:
            idle, busy = timed[path, "idle"][name], timed[path, "training"][name]
            label = name if name != "auto" else f"auto ({idle[2]} idle, {busy[2]} beside training)"
            print(f"| {path} | {size} | {label} | {idle[0]:.0f} | {1000 * idle[1]:.1f} | {idle[3]:.2f} | "
                  f"{busy[0]:.0f} | {1000 * busy[1]:.1f} | {busy[3]:.2f} | {busy[0] / idle[0]:.0%} |")


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
    parser.add_argument("--thread_choices", nargs="+", metavar="GGUF",
                        help="time llama.cpp's thread choices on these GGUFs, idle and beside a training run")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per generation (--thread_choices)")
    parser.add_argument("--train_minutes", type=float, default=15,
                        help="the most the background training runs (--thread_choices); stopped when done")
    parser.add_argument("--quiet_wait", type=float, default=0, metavar="S",
                        help="on a shared machine: wait up to S seconds before each idle timing, and "
                             "before starting the training run, for other programs to use under a "
                             "quarter of a core (--thread_choices)")
    parser.add_argument("--architecture", choices=["gpt2", "windowed"], default="gpt2",
                        help="the model trained when training here (default: %(default)s)")
    args = parser.parse_args()
    if args.thread_choices:
        return thread_choices(args)

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
