"""Stage 1: choose the shape of your GPT and save it to model_config.pth.

    python llm_model.py                 # answer the questions
    python llm_model.py --n_layer 4 -y  # flags for some, defaults for the rest

The model itself is custom_llm/model.py; `from llm_model import GPTLanguageModel` still works.
"""

from custom_llm.cli import ArgumentParser, Question, add_question_flags, ask, run
from custom_llm.files import save_config
from custom_llm.memory import check_memory
from custom_llm.model import GPTLanguageModel, count_parameters

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

    return [
        Question("vocab_size", "Vocabulary size (train_llm.py sets the real one)", 10000),
        Question("n_embd", "Embedding size (n_embd)", 256),
        Question("n_head", "Number of attention heads (n_head)", 8, check=divides_n_embd),
        Question("n_layer", "Number of layers (n_layer)", 6),
        Question("block_size", "Context length in tokens (block_size)", 128),
        Question("dropout", "Dropout", 0.1),
        Question("tokenizer", "Tokenizer: char (one token per character) or bpe (trained on your text)",
                 "char", tokenizer_kind),
    ]


def main():
    parser = ArgumentParser(description="Choose the shape of your GPT and save it.")
    qs = questions()
    add_question_flags(parser, qs)
    parser.add_argument("--output", default="model_config.pth", help="where to save the config")
    args = parser.parse_args()

    config = ask("Configure your LLM model:", qs, args)
    check_memory(config)
    save_config(config, args.output)
    print(f"Model with {count_parameters(config) / 1e6:.2f}M parameters "
          f"(at vocab_size {config['vocab_size']}) saved to {args.output}")


if __name__ == "__main__":
    run(main)
