"""Stage 4: generate text from your GGUF with llama.cpp.

    python inference_gguf.py --query "ROMEO:"          # one prompt
    python inference_gguf.py                           # a prompt loop; /help lists its commands
    python inference_gguf.py --query "ROMEO:" --temperature 0   # greedy: same text as PyTorch
    python inference_gguf.py --query "ROMEO:" --stop "\\n\\n" --json   # one JSON object, for scripts

The prompt is printed, then the continuation as it is generated, then one resource line on
stderr. With --json, stdout holds one JSON object per generation and nothing else.
"""

import json
import os
import sys

from custom_llm import terminal
from custom_llm.cli import ArgumentParser, run
from custom_llm.commands import add_setting_flags, apply_command, command_help, describe, settings_from_flags
from custom_llm.errors import UserError
from custom_llm.resources import ResourceUse, human_bytes
from custom_llm.runtime import GGUFModel, gpu_offload_supported
from custom_llm.sampling import Sampler, Settings, stream


def say(text: str) -> None:
    """Everything that is not generated text goes to stderr, so stdout stays the text (or JSON);
    wrapped to the terminal's width there, one line per line in a log."""
    terminal.say(text, sys.stderr)


def generate_and_print(model: GGUFModel, prompt: str, settings: Settings, sampler: Sampler, as_json: bool):
    n_prompt = len(model.tokenize(prompt))
    if n_prompt > model.block_size:
        say(f"note: the prompt is {n_prompt} tokens; the model sees only its last "
            f"{model.block_size} (its context length)")

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if not as_json:
        show(prompt)
    with ResourceUse(gpu=model.on_gpu) as use:
        result = stream(model, prompt, settings, sampler, on_text=None if as_json else show)
    if as_json:
        show(json.dumps(result.as_dict(settings), ensure_ascii=False) + "\n")
    else:
        show("\n")
    say(resource_line(result, use))
    return result


def resource_line(result, use) -> str:
    first = (f", first token in {1000 * result.time_to_first_token_s:.1f} ms"
             if result.time_to_first_token_s is not None else "")
    speed = f" at {result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s else ""
    line = (f"[prompt {result.n_prompt_tokens} tokens{first}; {len(result.tokens)} tokens{speed} "
            f"in {result.total_s:.2f}s; CPU {use.cpu_percent:.0f}%, peak RSS {human_bytes(use.peak_rss)}")
    if use.gpu_memory is not None:
        line += f", GPU memory {human_bytes(use.gpu_memory)}"
    elif use.gpu:
        line += ", GPU: all layers offloaded"
    if result.stop_reason != "max_tokens":
        line += f"; ended by {result.stop_reason.replace('_', ' ')}"
    return line + "]"


def prompt_loop(model: GGUFModel, settings: Settings, sampler: Sampler, as_json: bool, name: str) -> None:
    """Prompts until an empty line, Ctrl-D or /quit. Lines starting with / change settings."""
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows has no readline: input() still works, without history
            pass
        say(f"Loaded {name} (context {model.block_size} tokens). Type a prompt; /help lists the "
            "commands; an empty line or Ctrl-D quits.")
    while True:
        try:
            if as_json and interactive:   # keep the prompt marker off stdout
                say("> ")
                line = input()
            else:
                line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                say("")
            return
        except KeyboardInterrupt:     # Ctrl-C at the prompt: a fresh prompt, as in a shell
            say("")
            continue
        if not line:
            return
        if line.startswith("/") and not line.startswith("//"):
            if run_command(line[1:], settings) == "quit":
                return
            continue
        prompt = line[1:] if line.startswith("//") else line
        try:
            generate_and_print(model, prompt, settings, sampler, as_json)
        except KeyboardInterrupt:     # Ctrl-C outside the token loop (e.g. while printing)
            say("\n[interrupted]")


def run_command(text: str, settings: Settings):
    command, _, argument = text.partition(" ")
    if command == "quit":
        return "quit"
    if command == "help":
        say(command_help())
    elif command == "settings":
        say(describe(settings))
    else:
        try:
            say(apply_command(settings, command, argument))
        except ValueError as reason:
            say(f"error: {reason}")
    return None


def main():
    parser = ArgumentParser(description="Generate text from your GGUF model with llama.cpp.")
    parser.add_argument("--gguf_path", default="model.gguf.Q4_0.gguf")
    parser.add_argument("--query", default=None, help="the prompt; without it, prompts are read in a loop")
    add_setting_flags(parser, Settings())
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per generation (text, tokens, timings, settings)")
    parser.add_argument("--use_gpu", action="store_true", help="offload all layers to the GPU")
    parser.add_number("threads", shown_default="all cores")
    args = parser.parse_args()
    try:
        settings = settings_from_flags(args, Settings())
    except ValueError as reason:
        raise UserError(str(reason), 2) from None

    use_gpu = args.use_gpu
    if use_gpu and not gpu_offload_supported():
        say("note: this llama.cpp build has no GPU backend; running on the CPU")
        use_gpu = False
    model = GGUFModel(args.gguf_path, use_gpu=use_gpu, n_threads=args.threads)
    sampler = Sampler(settings)   # reads settings at each token, so /commands apply at once

    if args.query is None:
        prompt_loop(model, settings, sampler, args.json, os.path.basename(args.gguf_path))
    elif generate_and_print(model, args.query, settings, sampler, args.json).stop_reason == "interrupted":
        sys.exit(130)


if __name__ == "__main__":
    run(main)
