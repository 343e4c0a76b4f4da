"""Checking an export against the PyTorch model it came from: the same tokens on the hard
strings, the same likeliest next token, logits within tolerance, on held-out windows of the
training text (a windowed model's: passes of architectures.check_length tokens, far past its
block, and a greedy text of a few hundred tokens). convert_to_gguf.py runs these after every
export; the benchmarks reuse them."""

import os

import numpy as np

from custom_llm import data
from custom_llm.architectures import check_length
from custom_llm.chat_format import ChatFormat, end_ids, template_of_config
from custom_llm.corpus import find_documents, spec_exists
from custom_llm.errors import UserError
from custom_llm.evaluation import pytorch_logits
from custom_llm.text_data import text_dataset
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


def held_out_tokens(eval_text, config, tokenizer) -> data.HeldOut:
    """What to check the exports on: all of eval_text, else what training held out of the data
    recorded in the config (data.held_out: its held-out files or its last 10%; a chat model's
    held-out conversations, formatted one after the other, and themselves), which training never
    learned from. None when neither is there."""
    if eval_text:
        if not os.path.isfile(eval_text):
            raise UserError(f"--eval_text {eval_text} is not a file: give the path of a text "
                            "file to evaluate on", 2)
        return data.HeldOut(text_dataset(find_documents(eval_text), tokenizer).tokens.tolist(), eval_text)
    spec = config.get("dataset_path")
    if spec and spec_exists(spec):  # the same validation part training used
        return data.held_out(find_documents(spec, config.get("dataset_encoding", "utf-8")), tokenizer, config)
    return None


def held_out_windows(tokens: list, block_size: int, count: int = 4) -> list:
    """Up to `count` windows of block_size tokens, for the quick checks."""
    windows = [tokens[i:i + block_size] for i in range(0, len(tokens) - block_size + 1, block_size)]
    return windows[:count] or ([tokens] if tokens else [])


def check_windows(tokens: list, config: dict) -> list:
    """The windows whose logits are compared: up to 4 of block_size tokens (GPT-2); for a model
    that reads past its block, 2 passes of check_length tokens each, the held-out text repeated
    where it is shorter (what is checked is the long pass)."""
    length = check_length(config)
    if length == config["block_size"]:
        return held_out_windows(tokens, length)
    if tokens and len(tokens) < length:
        tokens = (list(tokens) * -(-length // len(tokens)))[:length]
    return held_out_windows(tokens, length, count=2)


GREEDY_TOKENS = 300        # a windowed model's greedy check: at least this many tokens, and 2 blocks


def greedy_prompt(tokens: list, config: dict, end_of_text: int):
    """The prompt of the greedy-text check (a windowed model's), or None (GPT-2: its checks are
    the windows): the first half-block of held-out tokens."""
    if check_length(config) == config["block_size"]:
        return None
    return list(tokens[:max(1, config["block_size"] // 2)]) or [end_of_text]


def check_greedy(export_format, path, model, tokenizer, prompt: list) -> dict:
    """The export's greedy text after prompt against PyTorch generate(temperature=0), for
    max(GREEDY_TOKENS, 2 blocks + 1) tokens or up to the end of text (or of a turn): n (tokens
    compared) and result (compare_answers: 'equal', 'near tie' or 'differ')."""
    n = max(GREEDY_TOKENS, 2 * model.config["block_size"] + 1)
    expected = greedy_answer(model, prompt, n, end_ids(tokenizer, template_of_config(model.config, tokenizer)))
    got = export_format.greedy_read_back(path, prompt, n)
    return {"n": len(expected), "result": compare_answers(model, prompt, expected, got, export_format.tolerance)}


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


# ------------------------------------------------------------------------------ chat

CHAT_CHECKS = 3            # held-out conversations whose formatting and greedy answers are compared
MIN_ANSWER_ROOM = 8        # tokens an answer needs at least, within the block, to be compared


def chat_prompts(conversations, tokenizer, config: dict, count: int = CHAT_CHECKS) -> list:
    """[(messages up to a held-out conversation's last answer, its ids as PyTorch formats them)]
    for the first `count` conversations that fit the block with room for an answer; [] for a
    model that is not a chat model, or no conversations."""
    template = template_of_config(config, tokenizer)
    if not conversations or template is None:
        return []
    chat, prompts = ChatFormat(tokenizer, template), []
    for messages in conversations:
        last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids = chat.encode(messages[:last_answer], add_generation_prompt=True)[0].tolist()
        if last_answer and len(ids) + MIN_ANSWER_ROOM <= config["block_size"]:
            prompts.append((messages[:last_answer], ids))
        if len(prompts) == count:
            break
    return prompts


def greedy_answer(model, prompt_ids: list, max_tokens: int, end_ids) -> list:
    """PyTorch's greedy answer: the ids after the prompt, up to and with the first end token."""
    import torch
    answer = model.generate(torch.tensor([prompt_ids]), max_tokens, temperature=0)[0, len(prompt_ids):].tolist()
    for i, token in enumerate(answer):
        if token in end_ids:
            return answer[:i + 1]
    return answer


def compare_answers(model, prompt_ids, expected, got, tolerance) -> str:
    """'equal', 'near tie' (they part where PyTorch's two choices are within the format's logit
    tolerance of each other: float rounding picks either) or 'differ'. got may be cut short (a
    front end reports the ids it evaluated): then its length is what is compared."""
    for i, (want, have) in enumerate(zip(expected, got)):
        if want != have:
            logits = pytorch_logits(model)(prompt_ids + expected[:i])[-1]
            close = logits[want] - logits[have] <= (tolerance or 0) * np.abs(logits).max()
            return "near tie" if close else "differ"
    return "equal" if len(got) <= len(expected) else "differ"


def check_chat(export_format, path, model, tokenizer, prompts) -> dict:
    """How an export formats and answers held-out conversations, against PyTorch:
    prompts_agree (formatted id for id), answers (compare_answers of each greedy answer), ended
    (answers that end at the end-of-turn token)."""
    block = model.config["block_size"]
    budgets = [block - len(ids) for _, ids in prompts]
    read = export_format.chat_read_back(path, [m for m, _ in prompts], budgets)
    template = template_of_config(model.config, tokenizer)
    end_of_turn = tokenizer.token_to_id(template.end_of_turn)
    prompts_agree, answers, ended = 0, [], 0
    for (_, ids), budget, (got_prompt, got_answer) in zip(prompts, budgets, read):
        prompts_agree += got_prompt == ids
        expected = greedy_answer(model, ids, budget, end_ids(tokenizer, template))
        answers.append(compare_answers(model, ids, expected, got_answer, export_format.tolerance))
        ended += bool(got_answer) and got_answer[-1] == end_of_turn
    return {"prompts_agree": prompts_agree, "answers": answers, "ended": ended, "count": len(prompts)}
