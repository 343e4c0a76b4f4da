"""Past the trained block: what front ends that do not slide get, against this project's sliding window.

    python benchmarks/bench_context.py --workdir DIR   # a folder where the pipeline ran
    python benchmarks/bench_context.py                 # trains the demo shape (block 64) for --minutes first

1. Front ends. llama-cpp-python's own Llama, as a user loads it, at its default context, at
   n_ctx = block_size, 2048, 4096 and 0 (the file's context), through __call__ ("ROMEO:", 200
   new tokens) and create_chat_completion (a chat longer than the block), for the GGUF as it
   was (a position table of block_size rows) and as convert_to_gguf.py writes it now. Each in a
   child process: whether it crashed, how many tokens came, why it stopped.
2. Quality past the block. Held-out text in windows of 2x and 4x block_size tokens, each read
   in one pass through llama.cpp, as a front end with that context reads it, with one F32 GGUF
   per position rule (gpt2.POSITION_RULES); against this project's sliding window
   (context.py: the older half dropped when the window is full) on the same windows and the
   same targets. Perplexity over every predicted token, and over those past the block alone.
   The sliding window is computed with the PyTorch model (the GGUF gives the same tokens).
3. A conversation that outgrows the block: the held-out text is a play, a conversation of
   named speakers. Perplexity of the block_size tokens that follow a conversation of 1, 2, 4, 8
   and 16 blocks, read in one pass (the chosen rule) against the sliding window.
4. The same model at any length (--parts any_length): held-out stretches of 8 blocks, each read
   in one llama.cpp pass (llama-cpp-python's Llama at n_ctx 512, 2048, 4096 and 0, its other
   settings its defaults: f16 cache) from the F32 GGUF; the mean loss of tokens 4 to 8 x block,
   against the same tokens each read by PyTorch with only its last block before it (what
   training taught). A windowed model should give the same in both; a GPT-2 model cannot.
5. Memory (--parts memory): a child process opens the Q8_0 GGUF at n_ctx 4096 and reads 8
   blocks of text, with llama-cpp-python's cache for windowed layers (swa_full: the whole
   context) and with llama.cpp's tools' (the window only): llama.cpp's own account of its
   caches and the process's peak RSS.
With --architecture windowed the demo model trained first is the windowed one.
Every figure is printed beside the CPU it was measured on.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from custom_llm.checks import held_out_tokens  # noqa: E402
from custom_llm.export import quantize_atomic, write_gguf_atomic  # noqa: E402
from custom_llm.gpt2 import POSITION_RULE, POSITION_RULES  # noqa: E402
from custom_llm.files import load_config, load_trained_model  # noqa: E402
from custom_llm.precision import cpu_info  # noqa: E402
from custom_llm.runtime import no_weight_repacking  # noqa: E402
from custom_llm.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
DEMO_SHAPE = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--dropout", "0"]
CPU = cpu_info()[0]


def prepare(args) -> str:
    """A folder with a trained model (the demo shape unless --workdir holds one)."""
    folder = args.workdir or tempfile.mkdtemp(prefix="bench-context-")

    def stage(*cmd):
        print(f"$ {' '.join(map(str, cmd))}", flush=True)
        subprocess.run([sys.executable, *map(str, cmd)], cwd=folder, check=True, stdout=subprocess.DEVNULL)

    if not os.path.exists(os.path.join(folder, "trained_model.pth")):
        stage(os.path.join(REPO, "llm_model.py"), "-y", *DEMO_SHAPE, "--architecture", args.architecture)
        stage(os.path.join(REPO, "train_llm.py"), "-y", "--dataset_path", os.path.abspath(args.text),
              "--minutes", args.minutes)
    return folder


# ------------------------------------------------------------------------ 1. front ends

# The child loads the file as a user of llama-cpp-python does (only llama.cpp's AMX weight
# repacking is off, as in this project's runtime: it crashes quantized models whatever the context).
CHILD = r"""
import json, sys, llama_cpp
from custom_llm.runtime import no_weight_repacking
path, n_ctx, way = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
with no_weight_repacking():
    llm = llama_cpp.Llama(model_path=path, verbose=False, seed=1, **({} if n_ctx is None else {"n_ctx": n_ctx}))
if way == "call":
    out = llm("ROMEO:", max_tokens=200)
else:
    turns = ["What say you, my lord?", "I say the night is long and full of care.",
             "Then let us speak of it till morning comes.", "Speak on; I will hear you to the end."]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    out = llm.create_chat_completion(messages, max_tokens=200)
print(json.dumps([llm.n_ctx(), out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"],
                  out["choices"][0]["finish_reason"]]))
"""


def front_end(path, n_ctx, way) -> str:
    result = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(n_ctx), way], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    if result.returncode < 0:   # killed by a signal: the whole process is gone
        assert_line = next((line.strip() for line in result.stderr.splitlines() if "GGML_ASSERT" in line), "")
        return f"crash (signal {-result.returncode}{'; ' + assert_line.split(': ', 1)[-1] if assert_line else ''})"
    if result.returncode != 0:   # a Python exception: the caller could have caught it
        error = next((line for line in reversed(result.stderr.splitlines()) if "Error" in line), "")
        return f"Python exception, process alive ({error.strip()[:90]})"
    context, n_prompt, n_new, reason = json.loads(result.stdout.strip().splitlines()[-1])
    return f"context {context}: prompt {n_prompt} + {n_new} tokens, {reason}"


def front_ends(folder, model, tokenizer, block):
    print(f"\n## 1. llama-cpp-python's Llama at the contexts front ends pick (block_size {block}; CPU: {CPU})\n")
    files = {}
    for label, rows in (("before (table of block_size rows)", block), ("after", None)):
        f32 = os.path.join(folder, f"bench-context.{'before' if rows else 'after'}.F32.gguf")
        write_gguf_atomic(model, tokenizer, f32, "F32", context_length=rows)
        q4 = f32.replace(".F32.", ".Q4_0.")
        quantize_atomic(f32, q4, "Q4_0")
        files[label] = q4
    print("| file (Q4_0) | n_ctx asked | way | result |")
    print("|---|---|---|---|")
    for label, path in files.items():
        for n_ctx in (None, block, 2048, 4096, 0):
            for way in ("call", "chat"):
                shown = "default" if n_ctx is None else n_ctx
                what = "`llm(\"ROMEO:\", max_tokens=200)`" if way == "call" else "create_chat_completion, 4 turns"
                print(f"| {label} | {shown} | {what} | {front_end(path, n_ctx, way)} |", flush=True)


# ------------------------------------------------------------------ 2. quality past the block

def log_probs(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def one_pass_nll(llm, tokens) -> np.ndarray:
    """-log p(tokens[i + 1] | tokens[:i + 1]) for every i, all tokens read at once (positions 0..)."""
    llm.reset()
    llm.eval(list(tokens[:-1]))
    lp = log_probs(np.array(llm.scores[:len(tokens) - 1]))
    return -lp[np.arange(len(tokens) - 1), tokens[1:]]


def sliding_nll(model, tokens, block) -> np.ndarray:
    """The same, following this project's context rule: the window grows to block tokens, then
    keeps its last block // 2 (context.slide). One forward pass per stretch between two slides."""
    nll, start, end, last = [], 0, 1, len(tokens) - 1
    while end <= last:                 # predicts tokens[end] from tokens[start:end]
        stop = min(start + block, last)
        with torch.no_grad():
            logits = model(torch.tensor([tokens[start:stop]]))[0][0].numpy()
        lp = log_probs(logits[end - 1 - start:])
        nll.append(-lp[np.arange(len(lp)), tokens[end:stop + 1]])
        end = stop + 1
        start = end - max(1, block // 2)   # tokens[stop] joined a full window: the older half goes
    return np.concatenate(nll)


def load_llama(path, n_ctx):
    import llama_cpp
    with no_weight_repacking():
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_batch=512)


def perplexity(nll) -> float:
    return float(np.exp(np.mean(nll)))


def quality(folder, model, tokenizer, block, eval_tokens, args):
    print(f"\n## 2. Perplexity past the block, one pass against the sliding window (CPU: {CPU})\n")
    paths = {}
    for rule in POSITION_RULES:
        paths[rule] = os.path.join(folder, f"bench-context.{rule}.F32.gguf")
        write_gguf_atomic(model, tokenizer, paths[rule], "F32", position_rule=rule)
    rows = []
    for factor in (2, 4):
        length = factor * block
        windows = [eval_tokens[i:i + length + 1] for i in range(0, len(eval_tokens) - length, length + 1)]
        windows = windows[:max(1, args.eval_tokens // length)]
        started = time.time()
        sliding = np.stack([sliding_nll(model, w, block) for w in windows])
        results = {"sliding window (this project)": sliding}
        for rule, path in paths.items():
            llm = load_llama(path, length)
            results[f"one pass, rule {rule}"] = np.stack([one_pass_nll(llm, w) for w in windows])
            del llm
        for name, nll in results.items():
            rows.append((factor, len(windows), name, perplexity(nll), perplexity(nll[:, :block]),
                         perplexity(nll[:, block:]), perplexity(nll[:, -block:])))
        print(f"(windows of {length} tokens: {len(windows)} windows, {time.time() - started:.1f}s)", flush=True)
    print(f"\nCPU: {CPU}. Held-out tokens in windows of L tokens, each window read from position 0; "
          f"block_size {block}.\n")
    print("| L | windows | reader | perplexity, all | positions < block | positions >= block | last block of L |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for factor, n, name, everything, inside, past, last in rows:
        print(f"| {factor}x = {factor * block} | {n} | {name} | {everything:.3f} | {inside:.3f} | {past:.3f} | "
              f"{last:.3f} |")


# ------------------------------------------------------------ 3. a conversation that grows

def conversation(model, tokenizer, folder, block, eval_tokens, args):
    print(f"\n## 3. The next {block} tokens after a conversation of n blocks (CPU: {CPU})\n")
    path = os.path.join(folder, f"bench-context.{POSITION_RULE}.F32.gguf")
    write_gguf_atomic(model, tokenizer, path, "F32", position_rule=POSITION_RULE)
    lengths = [n * block for n in (1, 2, 4, 8, 16)]
    needed = max(lengths) + block + 1
    starts = list(range(0, len(eval_tokens) - needed, needed))[:args.conversations]
    llm = load_llama(path, max(lengths) + block)
    print(f"| conversation so far | one pass, rule {POSITION_RULE} | sliding window | samples |")
    print("|---:|---:|---:|---:|")
    for length in lengths:
        one, slid = [], []
        for start in starts:
            tokens = eval_tokens[start:start + length + block + 1]
            one.append(one_pass_nll(llm, tokens)[-block:])
            slid.append(sliding_nll(model, tokens, block)[-block:])
        print(f"| {length} tokens ({length // block} blocks) | {perplexity(np.stack(one)):.3f} | "
              f"{perplexity(np.stack(slid)):.3f} | {len(starts)} |", flush=True)


# ------------------------------------------------------------------ 4. the same model at any length

def any_length(folder, model, tokenizer, block, eval_tokens, args):
    config = model.config
    print(f"\n## 4. Tokens 4 to 8 x block: one llama.cpp pass against each with its last block "
          f"({config.get('architecture', 'gpt2')}, block_size {block}; CPU: {CPU})\n")
    path = os.path.join(folder, "bench-context.any-length.F32.gguf")
    write_gguf_atomic(model, tokenizer, path, "F32")
    length = 8 * block
    stretches = [eval_tokens[i:i + length + 1] for i in range(0, len(eval_tokens) - length, length + 1)]
    stretches = stretches[:max(1, args.eval_tokens // length)]
    scored = slice(4 * block - 1, length)            # the nll of targets 4 x block .. 8 x block

    def last_block_nll(tokens):
        windows = torch.tensor(tokens[:length]).unfold(0, block, 1)[scored.start - block + 1:]  # end at 4b-1 .. 8b-1
        with torch.no_grad():
            logits = model(windows)[0][:, -1].numpy()
        return -log_probs(logits)[np.arange(len(windows)), tokens[scored.start + 1:length + 1]]

    reference = np.concatenate([last_block_nll(t) for t in stretches]).mean()
    rows = [("PyTorch, each token with its last block (as trained)", reference)]
    if config.get("architecture") == "windowed":
        with torch.no_grad():
            one = [-log_probs(model(torch.tensor([t[:length]]))[0][0].numpy())[np.arange(length), t[1:]][scored]
                   for t in stretches]
        rows.append(("PyTorch, one pass", np.concatenate(one).mean()))
    for n_ctx in (512, 2048, 4096, 0):
        llm = load_llama(path, n_ctx)
        nll = np.concatenate([one_pass_nll(llm, t)[scored] for t in stretches]).mean()
        rows.append((f"llama.cpp, one pass, n_ctx {n_ctx}{' (the file: ' + str(llm.n_ctx()) + ')' if n_ctx == 0 else ''}",
                     nll))
        del llm
    print(f"{len(stretches)} stretches of {length} held-out tokens; mean loss of the {len(stretches) * 4 * block:,} "
          f"tokens from position {4 * block} to {length}.\n")
    print("| reader | mean loss | against each with its last block |")
    print("|---|---:|---:|")
    for name, loss in rows:
        print(f"| {name} | {loss:.4f} | {100 * (loss / reference - 1):+.1f}% |")


# ------------------------------------------------------------------------------- 5. memory

MEMORY_CHILD = r"""
import json, sys, psutil, llama_cpp
from custom_llm.runtime import llama_log, no_weight_repacking
path, swa_full, n_tokens = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
mark = llama_log.mark()
with no_weight_repacking():
    llm = llama_cpp.Llama(model_path=path, n_ctx=4096, swa_full=swa_full, verbose=True)
llm.eval([1 + i % 50 for i in range(n_tokens)])
said = [line.strip() for line in llama_log.since(mark) if "MiB" in line and ("cache" in line or "buffer size" in line)]
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"said": said, "peak": peak}))
"""


def memory(folder, model, tokenizer, block, args):
    print(f"\n## 5. Memory at n_ctx 4096 ({model.config.get('architecture', 'gpt2')}, block_size {block}, "
          f"{model.num_parameters() / 1e6:.2f}M parameters; CPU: {CPU})\n")
    f32 = os.path.join(folder, "bench-context.memory.F32.gguf")
    write_gguf_atomic(model, tokenizer, f32, "F32")
    path = f32.replace(".F32.", ".Q8_0.")
    quantize_atomic(f32, path, "Q8_0")
    print(f"Q8_0 GGUF: {os.path.getsize(path) / 2**20:.1f} MiB; read {8 * block} tokens\n")
    print("| cache of windowed layers | peak RSS | llama.cpp's caches and buffers |")
    print("|---|---:|---|")
    for swa_full, label in ((True, "whole context (llama-cpp-python's default, swa_full)"),
                            (False, "the window (llama.cpp's tools' default)")):
        result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, path, "1" if swa_full else "0", str(8 * block)],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            print(f"| {label} | failed: {result.stderr.strip().splitlines()[-1:]} | |")
            continue
        found = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {label} | {found['peak'] / 2**20:.0f} MiB | {'; '.join(found['said'])} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a folder where the pipeline ran (default: train the demo shape)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="training text when training here")
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--eval_tokens", type=int, default=32768, help="held-out tokens per window length")
    parser.add_argument("--conversations", type=int, default=24, help="samples per conversation length")
    parser.add_argument("--parts", default="front_ends,quality,conversation",
                        help="which parts to run, comma-separated: front_ends, quality, conversation, "
                             "any_length, memory")
    parser.add_argument("--architecture", default="gpt2", choices=["gpt2", "windowed"],
                        help="the demo model's when trained here (llm_model.py --architecture)")
    args = parser.parse_args()

    folder = prepare(args)
    config = load_config(os.path.join(folder, "model_config.pth"))
    model = load_trained_model(os.path.join(folder, "trained_model.pth"), config).eval()
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    block = config["block_size"]
    held_out = held_out_tokens(None, config, tokenizer)
    eval_tokens, source = held_out.tokens, held_out.source
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"CPU: {CPU}; {datetime.date.today()}; commit {commit}; model {model.num_parameters() / 1e6:.2f}M "
          f"parameters, block_size {block}; held-out text: {source} ({len(eval_tokens):,} tokens)")
    parts = args.parts.split(",")
    if "front_ends" in parts:
        front_ends(folder, model, tokenizer, block)
    if "quality" in parts:
        quality(folder, model, tokenizer, block, eval_tokens, args)
    if "conversation" in parts:
        conversation(model, tokenizer, folder, block, eval_tokens, args)
    if "any_length" in parts:
        any_length(folder, model, tokenizer, block, eval_tokens, args)
    if "memory" in parts:
        memory(folder, model, tokenizer, block, args)


if __name__ == "__main__":
    main()
