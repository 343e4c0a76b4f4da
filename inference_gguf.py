"""Stage 4: generate text from your GGUF with llama.cpp.

    python inference_gguf.py --query "ROMEO:"          # one prompt
    python inference_gguf.py                           # a prompt loop; empty line or Ctrl-D ends it
    python inference_gguf.py --query "ROMEO:" --temperature 0   # greedy: same text as PyTorch

The prompt is printed, then the continuation as it is generated, then one resource line.
"""

import codecs
import os
import resource
import sys
import time

import psutil

from custom_llm.cli import ArgumentParser, UserError, human_bytes, run
from custom_llm.runtime import GGUFModel, Sampler, gpu_offload_supported


class ResourceUse:
    """CPU and memory used while generating: CPU time over wall time of the generation itself
    (100% = one core busy), and the process's peak resident memory (the kernel's high-water mark)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.started, self.cpu_started = time.perf_counter(), self._cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.started
        self.cpu_percent = 100 * (self._cpu_seconds() - self.cpu_started) / max(self.elapsed, 1e-9)
        self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return False

    def _cpu_seconds(self):
        times = self.process.cpu_times()
        return times.user + times.system


def generate_and_print(model: GGUFModel, prompt: str, args, sampler: Sampler) -> None:
    prompt_tokens = model.tokenize(prompt)
    if len(prompt_tokens) > model.block_size:
        print(f"note: the prompt is {len(prompt_tokens)} tokens; the model sees only its last "
              f"{model.block_size} (its context length)", file=sys.stderr)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens may split a character
    produced = 0
    with ResourceUse() as use:
        for token in model.generate(prompt_tokens, args.max_tokens, sampler):
            if token == model.end_of_text:
                break
            produced += 1
            sys.stdout.write(decoder.decode(model.token_bytes(token)))
            sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    line = (f"[{produced} tokens in {use.elapsed:.2f}s, {produced / max(use.elapsed, 1e-9):.0f} tokens/s, "
            f"CPU {use.cpu_percent:.0f}%, peak RSS {human_bytes(use.peak_rss)}")
    if args.use_gpu and model.on_gpu:
        line += ", GPU: all layers offloaded"
    print(line + "]", file=sys.stderr)


def check_settings(args) -> None:
    if args.max_tokens <= 0:
        raise UserError(f"--max_tokens: {args.max_tokens} must be a positive whole number", 2)
    if args.temperature < 0:
        raise UserError(f"--temperature: {args.temperature} must be 0 (greedy) or more", 2)
    if args.top_k is not None and args.top_k <= 0:
        raise UserError(f"--top_k: {args.top_k} must be a positive whole number", 2)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p: {args.top_p} must be above 0 and at most 1", 2)


def main():
    parser = ArgumentParser(description="Generate text from your GGUF model with llama.cpp.")
    parser.add_argument("--gguf_path", default="model.gguf.Q4_0.gguf")
    parser.add_argument("--query", default=None, help="the prompt; without it, prompts are read in a loop")
    parser.add_argument("--max_tokens", type=int, default=100, help="tokens to generate")
    parser.add_argument("--use_gpu", action="store_true", help="offload all layers to the GPU")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="same seed and settings, same text")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    args = parser.parse_args()
    check_settings(args)

    use_gpu = args.use_gpu
    if use_gpu and not gpu_offload_supported():
        print("note: this llama.cpp build has no GPU backend; running on the CPU", file=sys.stderr)
        use_gpu = False
    model = GGUFModel(args.gguf_path, use_gpu=use_gpu, n_threads=args.threads)
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)

    if args.query is not None:
        generate_and_print(model, args.query, args, sampler)
        return

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
        print(f"Loaded {os.path.basename(args.gguf_path)} (context {model.block_size} tokens). "
              "Type a prompt; an empty line or Ctrl-D quits.")
    while True:
        try:
            prompt = input("> " if interactive else "")
        except EOFError:
            break
        if not prompt:
            break
        try:
            generate_and_print(model, prompt, args, sampler)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)


if __name__ == "__main__":
    run(main)
