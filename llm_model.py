"""Stage 1: choose the shape of your GPT and save it to model_config.pth.

    python llm_model.py                 # answer the questions
    python llm_model.py --n_layer 4 -y  # flags for some, defaults for the rest

The model itself is custom_llm/model.py; `from llm_model import GPTLanguageModel` still works.
"""

from custom_llm.cli import ArgumentParser, Question, add_question_flags, ask, run
from custom_llm.files import save_config
from custom_llm.memory import check_memory
from custom_llm.model import GPTLanguageModel, count_parameters
from custom_llm.terminal import say
from custom_llm.tokenizer import build_char_tokenizer

__all__ = ["GPTLanguageModel"]


def tokenizer_kind(text: str) -> str:
    if text.strip().lower() not in ("char", "bpe"):
        raise ValueError(f"{text!r} is not a tokenizer kind: choose char or bpe")
    return text.strip().lower()


def questions():
    def divides_n_embd(n_head, answers):
        n_embd = answers["n_embd"]
        if n_embd % n_head:
            return f"n_embd {n_embd} is not divisible by n_head {n_head}; pick a divisor such as " \
                   + ", ".join(str(d) for d in (1, 2, 4, 8, 16) if n_embd % d == 0)
        return None

    def only_for_bpe(answers):
        if answers["tokenizer"] != "bpe":
            return ("only the bpe tokenizer has a size to choose; the char tokenizer's vocabulary is the "
                    "characters of your text: add --tokenizer bpe, or leave out --vocab_size")
        return None

    return [
        Question("tokenizer", "Tokenizer: char (per character) or bpe (learned from your text)",
                 "char", tokenizer_kind),
        Question("vocab_size", "BPE vocabulary size (tokens to learn from your text)", 10000,
                 not_applicable=only_for_bpe),
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


def main():
    parser = ArgumentParser(description="Choose the shape of your GPT and save it.")
    qs = questions()
    add_question_flags(parser, qs)
    parser.add_argument("--output", default="model_config.pth", help="where to save the config")
    args = parser.parse_args()

    config = ask("Configure your LLM model:", qs, args)
    if config["tokenizer"] == "char":
        # Until train_llm.py counts the text's characters: the 256 bytes and the special tokens
        # every char tokenizer has.
        config["vocab_size"] = build_char_tokenizer([]).get_vocab_size()
    check_memory(config)
    save_config(config, args.output)
    say(f"Saved {args.output}: {size_line(config)}")


if __name__ == "__main__":
    run(main)
