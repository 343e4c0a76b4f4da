"""Stage 1: choose the shape of your GPT and save it to model_config.pth.

    python llm_model.py                 # answer the questions
    python llm_model.py --n_layer 4 -y  # flags for some, defaults for the rest
    printf '5000\n64\n4\n2\n64\n0.0\n' | python llm_model.py   # piped answers, in the questions' order
    python llm_model.py --architecture gpt2       # GPT-2's graph: learned positions, exact within its block

The first question is the vocabulary: a number is a BPE of that many tokens, learned from your
text by train_llm.py; `char` is one token per character of it. Every answer is checked here, so a
shape that cannot train is refused now, with its reason, not later in training. The model itself
is an architecture module (custom_llm/architectures.py), chosen with --architecture: windowed, the
default (docs/windowed.md: rotary positions and a window of block_size tokens on every layer, the
same model at any length in every reader, trained on rows of --train_windows windows), or gpt2
(learned positions: the exported model is exact within block_size tokens only).
`from llm_model import build_model` makes the model a saved config describes.
"""

from custom_llm import windowed
from custom_llm.architectures import ARCHITECTURES, DEFAULT as DEFAULT_ARCHITECTURE
from custom_llm.cli import ArgumentParser, Question, add_question_flags, ask, run
from custom_llm.errors import UserError
from custom_llm.files import save_config
from custom_llm.flags import parse_number
from custom_llm.memory import check_memory
from custom_llm.model import build_model, count_parameters
from custom_llm.terminal import say
from custom_llm.tokenizer import MIN_BPE_VOCABULARY, build_char_tokenizer

__all__ = ["build_model"]
DEFAULT_BPE_SIZE = 10000   # --tokenizer bpe without a size


def vocabulary(text: str):
    """'char', or a BPE size: a whole number of at least MIN_BPE_VOCABULARY."""
    if text.strip().lower() == "char":
        return "char"
    try:
        size = parse_number(text.strip(), int)
    except ValueError:
        raise ValueError(f"{text!r} is neither char nor a whole number of tokens") from None
    if size < MIN_BPE_VOCABULARY:
        raise ValueError(f"a BPE vocabulary of {size} tokens cannot hold the 256 byte tokens, <|endoftext|> and "
                         f"one merge: give {MIN_BPE_VOCABULARY} or more (1000 to 50000 is usual), or char for one "
                         "token per character")
    return size


def questions(tokenizer_flag=None, architecture=DEFAULT_ARCHITECTURE):
    """The questions, in the order piped answers follow. --tokenizer (an older way to choose)
    sets what the vocabulary question means when it is not answered; --architecture what a head
    must be."""
    def fits_tokenizer_flag(answer, answers):
        if tokenizer_flag == "char" and answer != "char":
            return f"{answer} is a BPE size, but --tokenizer char has one token per character: leave one out"
        if tokenizer_flag == "bpe" and answer == "char":
            return "char contradicts --tokenizer bpe: give a BPE size, or leave out --tokenizer"
        return None

    def divides_n_embd(n_head, answers):
        n_embd = answers["n_embd"]
        if n_embd % n_head:
            return f"n_embd {n_embd} is not divisible by n_head {n_head}; pick a divisor such as " \
                   + ", ".join(str(d) for d in (1, 2, 4, 8, 16) if n_embd % d == 0)
        if architecture == windowed.NAME and (n_embd // n_head) % 2:
            return f"the head size n_embd / n_head = {n_embd // n_head} is odd, and the windowed " \
                   "architecture's rotary positions turn pairs of dimensions: pick an n_head that leaves " \
                   "an even head size, such as " + ", ".join(
                       str(d) for d in (1, 2, 4, 8, 16) if n_embd % d == 0 and (n_embd // d) % 2 == 0)
        return None

    return [
        Question("vocab_size", "Vocabulary: a BPE size, or char for one token per character",
                 DEFAULT_BPE_SIZE if tokenizer_flag == "bpe" else "char", vocabulary,
                 check=fits_tokenizer_flag),
        Question("n_embd", "Embedding size (n_embd)", 256),
        Question("n_head", "Number of attention heads (n_head)", 8, check=divides_n_embd),
        Question("n_layer", "Number of layers (n_layer)", 6),
        Question("block_size", "Context length in tokens (block_size)", 128),
        Question("dropout", "Dropout", 0.1),
    ]


def size_line(config: dict) -> str:
    """How many parameters the model will have: exact for BPE (at the size asked; a small text
    may fill less of it), and per vocabulary entry for the char tokenizer, whose vocabulary is
    only known once train_llm.py has read the text."""
    if config["tokenizer"] == "bpe":
        return (f"{count_parameters(config) / 1e6:.2f}M parameters with a BPE vocabulary of "
                f"{config['vocab_size']} (train_llm.py learns it from your text; fewer if the text is small)")
    without_vocabulary = count_parameters({**config, "vocab_size": 0})
    return (f"{without_vocabulary / 1e6:.2f}M parameters plus 2 x {config['n_embd']} per vocabulary entry "
            f"({count_parameters(config) / 1e6:.2f}M at the smallest, {config['vocab_size']} entries): the char "
            "tokenizer's vocabulary is the characters of your text, counted by train_llm.py")


def architecture_line(config: dict) -> str:
    """What the architecture means for the user: where the model is exact."""
    block = config["block_size"]
    if config["architecture"] == windowed.NAME:
        windows = config["train_windows"]
        return (f"Architecture: windowed: rotary positions and a window of {block} tokens on every layer, the "
                f"same model at any length in every reader; trained on rows of {windows} windows "
                f"({windows * block} tokens). --architecture gpt2 for GPT-2's graph")
    return (f"Architecture: gpt2: learned positions, exact within {block} tokens; past them inference_gguf.py "
            "slides a window and other front ends run it worse (docs/context.md)")


def train_windows(architecture: str, given) -> int:
    """Windows of block_size in one training row: --train_windows, else the architecture's default.
    GPT-2's learned positions end at the block, so its rows are one window."""
    module = ARCHITECTURES[architecture]
    if given is None:
        return module.TRAIN_WINDOWS
    if given > 1 and module.TRAIN_WINDOWS == 1:
        raise UserError(f"--train_windows {given}: the {architecture} architecture has learned positions up to "
                        "block_size only, so it trains on one window; use --architecture windowed for longer rows", 2)
    return given


def main():
    parser = ArgumentParser(description="Choose the shape of your GPT and save it.")
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default=None,
                        help="char or bpe; the same as answering the vocabulary question with char or a size "
                             f"(--tokenizer bpe alone: {DEFAULT_BPE_SIZE} tokens)")
    parser.add_argument("--architecture", choices=list(ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                        help="gpt2: learned positions, the context is block_size; windowed: rotary positions "
                             "and a window of block_size tokens on every layer, the same model at any length "
                             "(docs/windowed.md) (default: %(default)s)")
    parser.add_number("train_windows", shown_default=f"{windowed.TRAIN_WINDOWS} for windowed, 1 for gpt2")
    add_question_flags(parser, questions())
    parser.add_argument("--output", default="model_config.pth", help="where to save the config")
    args = parser.parse_args()
    windows = train_windows(args.architecture, args.train_windows)

    config = ask("Configure your LLM model:", questions(args.tokenizer, args.architecture), args)
    # The char tokenizer's size is known once train_llm.py has counted the text's characters:
    # until then, the 256 bytes and the special tokens every char tokenizer has.
    vocab = config["vocab_size"]
    config.update(architecture=args.architecture, tokenizer="char" if vocab == "char" else "bpe",
                  vocab_size=build_char_tokenizer([]).get_vocab_size() if vocab == "char" else vocab)
    if ARCHITECTURES[args.architecture].TRAIN_WINDOWS > 1:   # a GPT-2 config stays as it was before there was a choice
        config["train_windows"] = windows
    check_memory(config)
    save_config(config, args.output)
    say(f"Saved {args.output}: {size_line(config)}")
    say(architecture_line(config))


if __name__ == "__main__":
    run(main)
