"""Teaching a GPT-2-sized model to answer: `train_llm.py --init_from FOLDER` on conversations, at
GPT-2's 124M shape, on this machine.

    python benchmarks/bench_chat_gpt2.py                  # 3 steps, then the speed train_llm.py reports
    python benchmarks/bench_chat_gpt2.py --steps 5 --keep

Nothing is downloaded: the folder is a GPT2LMHeadModel(GPT2Config()) with random weights (12
layers, n_embd 768, 12 heads, 1024 positions) and a byte-level BPE of GPT-2's 50,257 tokens whose
merges are made up here, saved with save_pretrained. The conversations are made-up spelling
exchanges. train_llm.py grows the tokenizer and the model by the chat's two tokens, packs the
conversations into 1024-token windows and trains on the answers; this prints what it said (the
vocabulary growth, the packing, the plan) and its tokens/s, with the CPU it ran on.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from custom_llm.precision import cpu_summary  # noqa: E402
from custom_llm.tokenizer import BYTE_SYMBOLS, END_OF_TEXT, build_bpe_tokenizer  # noqa: E402

GPT2_VOCAB = 50257


def made_up_bpe(size: int, seed: int = 0):
    """A valid byte-level BPE of `size` tokens (the last <|endoftext|>): each merge joins two
    tokens already there, drawn at random, so the vocabulary has GPT-2's size (what the embedding
    and the head cost) without GPT-2's files."""
    rng = random.Random(seed)
    vocab = {symbol: i for i, symbol in enumerate(BYTE_SYMBOLS)}
    tokens, merges = list(BYTE_SYMBOLS), []
    while len(vocab) < size - 1:
        left, right = rng.choice(tokens[:4096]), rng.choice(tokens[:4096])
        if left + right in vocab or len(left + right) > 12:
            continue
        merges.append((left, right))
        vocab[left + right] = len(vocab)
        tokens.append(left + right)
    vocab[END_OF_TEXT] = len(vocab)
    return build_bpe_tokenizer(vocab, merges)


def save_gpt2_shaped_folder(folder: str) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    tokenizer = made_up_bpe(GPT2_VOCAB)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=eot, eos_token_id=eot)).save_pretrained(folder)
    GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                      unk_token=END_OF_TEXT).save_pretrained(folder)


def write_conversations(path: str, n: int = 3000, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Spell {word}"},
                                             {"role": "assistant", "content": "-".join(word)}]}) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    print(f"date: {time.strftime('%Y-%m-%d')}; command: python benchmarks/bench_chat_gpt2.py --steps {args.steps}")
    folder = tempfile.mkdtemp(prefix="bench-chat-gpt2-")
    try:
        started = time.time()
        save_gpt2_shaped_folder(os.path.join(folder, "gpt2-shaped"))
        write_conversations(os.path.join(folder, "chats.jsonl"))
        print(f"made the 124M-shaped folder and 3,000 conversations in {time.time() - started:.0f}s")
        command = [sys.executable, os.path.join(REPO, "train_llm.py"), "--init_from", "gpt2-shaped",
                   "--dataset_path", "chats.jsonl", "--max_steps", str(args.steps), "--eval_batches", "1", "-y"]
        started = time.time()
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        print(f"train_llm.py ran {time.time() - started:.0f}s, exit status {result.returncode}; it said:")
        for line in result.stdout.splitlines():
            print("  " + line)
        if result.returncode:
            print(result.stderr)
            sys.exit(1)
        lines = result.stdout.splitlines()
        timed = re.search(r"about ([\d,]+) tokens/s", next(line for line in lines if line.startswith("Speed: ")))
        whole = re.search(r"([\d,]+) tokens/s", next(line for line in lines if line.startswith("Saved ")))
        print(f"\ntokens/s training on conversations at GPT-2's shape: {timed.group(1)} for one micro-batch "
              f"timed before the first step; {whole.group(1)} over the whole run (its evaluation and the save "
              "of the weights included)")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
