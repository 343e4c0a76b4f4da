"""Stage 4: generate text from your GGUF with llama.cpp.

    python inference_gguf.py --query "ROMEO:"          # one prompt
    python inference_gguf.py                           # a prompt loop; /help lists its commands
    python inference_gguf.py --query "ROMEO:" --temperature 0   # greedy: same text as PyTorch
    python inference_gguf.py --query "ROMEO:" --stop "\\n\\n" --json   # one JSON object, for scripts

The prompt is printed, then the continuation as it is generated, then one resource line on
stderr. With --json, stdout holds one JSON object per generation and nothing else.

A chat model (one trained on conversations: its GGUF has a chat template) answers instead:

    python inference_gguf.py --query "Spell kadu"      # one user turn; only the answer is printed
    python inference_gguf.py --chat                    # a conversation, one message per line
    python inference_gguf.py --chat --system "Answer briefly."   # with a system message

The conversation is kept from line to line; its oldest whole turns are dropped when it no longer
fits the context (the system message stays), and /reset starts it over. An answer ends at the
end of its turn.

The context: a GPT-2 model's is its block_size, and past it the text slides (docs/context.md). A
windowed model (docs/windowed.md) reads any length the same way: nothing slides, and a
conversation is kept up to the context llama.cpp opens for it (the file's 4,096 tokens).
"""

import json
import os
import sys

from custom_llm import terminal
from custom_llm.chat_format import ChatHistory, TurnTooLong
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


def show(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def generate_and_print(model: GGUFModel, prompt: str, settings: Settings, sampler: Sampler, as_json: bool):
    n_prompt = len(model.tokenize(prompt))
    if n_prompt > model.block_size and not model.windowed:
        say(f"note: the prompt is {n_prompt} tokens; the model sees only its last "
            f"{model.block_size} (its context length)")
    if not as_json:
        show(prompt)
    return run_and_print(model, prompt, settings, sampler, as_json)


def answer_and_print(model: GGUFModel, conversation: ChatHistory, message: str, settings: Settings,
                     sampler: Sampler, as_json: bool):
    """A chat model's answer to message, the newest user turn of the conversation, which then
    holds the answer too. Only the answer is printed. Raises UserError, and sends nothing, when
    the message does not fit the context with room for an answer."""
    # Room kept for the answer: a quarter of the context at most, so that earlier turns stay (a
    # longer answer slides the window, as any generation does). The context: the block (GPT-2),
    # or what llama.cpp opened for a windowed model, which reads any length.
    context = model.context
    room = min(settings.max_tokens, context // 4)
    try:
        messages, ids, dropped = conversation.fit(message, model.encode_chat, context - room)
    except TurnTooLong as err:
        system = " with the system message" if conversation.system is not None else ""
        raise UserError(f"this message takes {err.n_tokens} tokens as a turn{system}; the context is "
                        f"{context} tokens, {room} of them kept for the answer (a lower max_tokens "
                        "keeps fewer): not sent", 2)
    if dropped:
        say(f"note: the {dropped} oldest turns no longer fit the context of {context} tokens "
            "and were dropped" if dropped > 1 else
            f"note: the oldest turn no longer fits the context of {context} tokens and was dropped")
    result = run_and_print(model, message, settings, sampler, as_json, ids, messages)
    conversation.add(message, result.text)
    return result


def run_and_print(model, prompt, settings, sampler, as_json, prompt_tokens=None, messages=None):
    """Generate, streaming the text to stdout (or one JSON object after it), then the resource
    line on stderr. messages: the conversation sent (a chat model's), for the JSON object."""
    with ResourceUse(gpu=model.on_gpu) as use:
        result = stream(model, prompt, settings, sampler, on_text=None if as_json else show,
                        prompt_tokens=prompt_tokens)
    if as_json:
        out = result.as_dict(settings)
        if messages is not None:
            out["messages"] = messages + [{"role": "assistant", "content": result.text}]
        show(json.dumps(out, ensure_ascii=False) + "\n")
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


def prompt_loop(model: GGUFModel, settings: Settings, sampler: Sampler, as_json: bool, name: str,
                conversation: ChatHistory = None) -> None:
    """Prompts until an empty line, Ctrl-D or /quit. Lines starting with / change settings. With
    a conversation (a chat model), each line is the user's next turn."""
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows has no readline: input() still works, without history
            pass
        if conversation is None:
            say(f"Loaded {name} ({describe_context(model)}). Type a prompt; /help lists the "
                "commands; an empty line or Ctrl-D quits.")
        else:
            say(f"Loaded {name}, a chat model ({describe_context(model)}): the conversation is "
                "kept from message to message. Type a message; /reset starts over, /help lists the "
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
            if run_command(line[1:], settings, conversation) == "quit":
                return
            continue
        prompt = line[1:] if line.startswith("//") else line
        try:
            if conversation is None:
                generate_and_print(model, prompt, settings, sampler, as_json)
            else:
                answer_and_print(model, conversation, prompt, settings, sampler, as_json)
        except UserError as err:      # a message too long for the context: the loop goes on
            say(f"error: {err}")
        except KeyboardInterrupt:     # Ctrl-C outside the token loop (e.g. while printing)
            say("\n[interrupted]")


def describe_context(model: GGUFModel) -> str:
    if model.windowed:
        return f"a window of {model.block_size} tokens, any length; a conversation keeps {model.context}"
    return f"context {model.block_size} tokens"


def run_command(text: str, settings: Settings, conversation: ChatHistory = None):
    command, _, argument = text.partition(" ")
    if command == "quit":
        return "quit"
    if command == "reset" and conversation is not None:
        conversation.reset()
        say("conversation cleared" + (" (the system message stays)" if conversation.system is not None else ""))
    elif command == "help":
        say(command_help(chat=conversation is not None))
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
    parser.add_argument("--query", default=None, help="the prompt (a chat model's: the user's message); "
                        "without it, prompts are read in a loop")
    parser.add_argument("--chat", action="store_true",
                        help="hold a conversation with a chat model (one trained on conversations): each "
                             "line is a message, the answers are kept; a chat model's prompt loop does this anyway")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a chat model's system message")
    add_setting_flags(parser, Settings())
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per generation (text, tokens, timings, settings)")
    parser.add_argument("--use_gpu", action="store_true", help="offload all layers to the GPU")
    parser.add_number("threads", shown_default="chosen for the model's size and the cores other "
                      "programs leave free: one for a small model")
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
    conversation = chat_for(model, args)
    sampler = Sampler(settings)   # reads settings at each token, so /commands apply at once

    if args.query is None:
        prompt_loop(model, settings, sampler, args.json, os.path.basename(args.gguf_path), conversation)
    else:
        if conversation is None:
            result = generate_and_print(model, args.query, settings, sampler, args.json)
        else:
            result = answer_and_print(model, conversation, args.query, settings, sampler, args.json)
        if result.stop_reason == "interrupted":
            sys.exit(130)


def chat_for(model: GGUFModel, args):
    """A chat model's conversation (with --system's message), or None for a model that continues
    text; --chat and --system on such a model are errors."""
    if not model.is_chat:
        flag = "--chat" if args.chat else "--system" if args.system is not None else None
        if flag:
            raise UserError(f"{flag}: {args.gguf_path} was not trained on conversations (it has no chat "
                            "template); it continues text: run it without " + flag, 2)
        return None
    return ChatHistory(system=args.system)


if __name__ == "__main__":
    run(main)
