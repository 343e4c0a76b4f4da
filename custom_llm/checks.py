"""Checking an export against the PyTorch model it came from: the same tokens on the hard
strings, the same likeliest next token, logits within tolerance, on held-out windows of the
training text. convert_to_gguf.py runs these after every export; the benchmarks reuse them."""

import os

import numpy as np

from custom_llm.corpus import find_documents, spec_exists
from custom_llm.data import prepare_dataset
from custom_llm.errors import UserError
from custom_llm.evaluation import pytorch_logits
from custom_llm.tokenizer import encode

# Strings on which Python and an export must agree id for id: empty, whitespace runs, \r\n, tabs,
# emoji with joiners and skin tones, flags, combining marks, CJK, right-to-left scripts, NUL and
# control bytes, look-alikes of special tokens, long runs. check_export tokenizes them both ways.
HARD_STRINGS = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "\n\n\n",
    "line one\r\nline two\r\n",
    "\ttabs\tand\t\tmore\t",
    "Hello, World! 123 4567 3.14159",
    "don't won't it's I'm you're",
    "naïve café résumé Zürich",
    "e\u0301 a\u0308 combining marks\u0336",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир",
    "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈",
    "🇫🇷🇯🇵🇺🇸",
    "\x00\x01\x02\x1b[31m bell\x07",
    "<|endoftext|>",
    "text <|endoftext|> more <|endoftext",
    "<s></s>[INST]<unk>",
    "a" * 300,
    " " * 50 + "x",
    "\u200b\u200d\ufeff zero width",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
]


def held_out_tokens(eval_text, config, tokenizer):
    """(tokens, where they come from): all of eval_text, else the validation part of the training
    text recorded in the config (its held-out files, or its last 10%), which training never learned
    from. (None, None) when neither is there."""
    if eval_text:
        if not os.path.isfile(eval_text):
            raise UserError(f"--eval_text {eval_text} is not a file: give the path of a text "
                            "file to evaluate on", 2)
        return prepare_dataset(find_documents(eval_text), tokenizer).tokens.tolist(), eval_text
    spec = config.get("dataset_path")
    if spec and spec_exists(spec):  # the same validation tokens training used
        dataset = prepare_dataset(find_documents(spec, config.get("dataset_encoding", "utf-8")), tokenizer)
        return dataset.val.tolist(), dataset.val_source
    return None, None


def held_out_windows(tokens: list, block_size: int, count: int = 4) -> list:
    """Up to `count` windows of block_size tokens, for the quick checks."""
    windows = [tokens[i:i + block_size] for i in range(0, len(tokens) - block_size + 1, block_size)]
    return windows[:count] or ([tokens] if tokens else [])


def check_export(export_format, path, model, tokenizer, windows) -> dict:
    """Read the export at path back (export.Format's read_back) and compare it with the model:
    tokens_agree (hard strings tokenized the same, of len(HARD_STRINGS)), next_agree (share
    of positions with the same likeliest next token), rel_error (worst max |difference| /
    max |logit| over the windows), size in bytes and bits per weight (None where not known)."""
    tokens, logits = export_format.read_back(path, HARD_STRINGS, windows)   # a GGUF's may raise LlamaCrash
    agree = sum(got == encode(tokenizer, s) for s, got in zip(HARD_STRINGS, tokens))
    expected_of = pytorch_logits(model)
    same_next, total, worst = 0, 0, 0.0
    for window, got in zip(windows, logits):
        expected = expected_of(window)
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
        same_next += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(window)
    bits_per_weight = export_format.bits_per_weight(path) if export_format.bits_per_weight else None
    return {"size": _size(path), "bpw": bits_per_weight, "tokens_agree": agree,
            "next_agree": same_next / max(1, total), "rel_error": worst}


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)
