"""Generation: the prompt loop at a terminal, sampling controls, --json, stop strings, the
PyTorch KV cache, and the quantization report's numbers."""

import json
import math
import os
import re
import select
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, Terminal, one_line_error, prepare, run_script
from hypothesis import given, settings as hsettings, strategies as st

from custom_llm.text_data import VALIDATION_FRACTION
from custom_llm.export import write_gguf_atomic
from custom_llm.commands import apply_command
from custom_llm.sampling import Sampler, Settings, StopStrings
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import encode, load_tokenizer
from custom_llm.context import fit_prompt, slide
from custom_llm.files import load_config, load_trained_model

PROMPT = "The miller mends"


def generate_json(folder, *args, input=None):
    # One thread: on a busy 2-core machine llama.cpp's threads spin waiting for each other.
    result = run_script("inference_gguf.py", "--json", "--threads", 1, *args, cwd=folder, input=input)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def prompt_after(term, text):
    """Wait for text, then for the next "> " prompt (keys typed before readline is listening
    again can be lost)."""
    term.read_until(text)
    start = term.output.index(text)
    while "> " not in term.output[start:]:
        read_until_grown(term, len(term.output) + 1)


def read_until_grown(term, length, timeout=60):
    """Collect what the terminal shows until it holds `length` characters."""
    deadline = time.time() + timeout
    while len(term.output) < length:
        assert time.time() < deadline, f"output stopped growing:\n{term.output}"
        ready, _, _ = select.select([term.fd], [], [], 0.1)
        if ready:
            term.output += os.read(term.fd, 4096).decode("utf-8", "replace")


# ------------------------------------------------------------------------- prompt loop

def test_prompt_loop_commands_ctrl_c_and_ctrl_d(trained):
    folder, _ = trained
    term = Terminal("inference_gguf.py", "--max_tokens", 20, cwd=folder)
    term.read_until("> ")
    term.send("/temp 0\n")
    term.read_until("temperature = 0.0")
    term.send("/top_k many\n")
    term.read_until("error: /top_k: 'many' is not a whole number")
    term.send("/nonsense 3\n")
    term.read_until("unknown command /nonsense")
    term.send("/settings\n")
    term.read_until("temp 0.0, top_k off")
    term.send("/max 10000000\n")              # long enough to be interrupted
    term.read_until("max_tokens = 10000000")
    sent_at = len(term.output)
    term.send("Hello there\n")
    # The echoed line, the prompt as printed, then text streaming as it is generated.
    read_until_grown(term, sent_at + 100)
    term.send("\x03")                         # Ctrl-C: stops the generation...
    prompt_after(term, "interrupted")
    term.send("/max 5\n")                     # ...and the loop goes on
    prompt_after(term, "max_tokens = 5")
    term.send("Again\n")
    prompt_after(term, "; 5 tokens at")
    term.send("\x04")                         # Ctrl-D ends the loop
    assert term.wait() == 0


def test_prompt_loop_commands_from_a_pipe_and_json(trained):
    folder, _ = trained
    lines = ["/temp 1.0", "/seed 5", "/max 40", "A sailor", "A sailor", "/seed 6", "A sailor",
             "/quit", "never read"]
    outputs = generate_json(folder, input="\n".join(lines) + "\n")
    assert len(outputs) == 3
    assert outputs[0]["text"] == outputs[1]["text"]       # same seed and settings: same text
    assert outputs[2]["text"] != outputs[0]["text"]       # another seed: another text
    assert all(o["settings"]["seed"] in (5, 6) and o["settings"]["temperature"] == 1.0 for o in outputs)


def test_commands_change_settings_or_say_why_not():
    s = Settings()
    assert "top_p" in apply_command(s, "top_p", "0.9") and s.top_p == 0.9
    apply_command(s, "top_p", "off")
    assert s.top_p is None
    apply_command(s, "stop", r"\n\n")
    assert s.stop == ["\n\n"]
    apply_command(s, "stop", "")
    assert s.stop == []
    for command, value in [("temp", "-1"), ("min_p", "2"), ("repeat_penalty", "0"), ("max", "0"),
                           ("seed", "x"), ("temp", "nan"), ("max", "off"), ("top_k", "")]:
        with pytest.raises(ValueError):
            apply_command(s, command, value)
    with pytest.raises(ValueError, match="unknown command"):
        apply_command(s, "tmp", "1")


# ---------------------------------------------------------------------- json and stops

def test_json_schema_and_nothing_else_on_stdout(trained):
    folder, _ = trained
    result = run_script("inference_gguf.py", "--json", "--query", PROMPT, "--temperature", "0",
                        "--max_tokens", 30, cwd=folder)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"prompt", "text", "tokens", "n_prompt_tokens", "n_tokens", "timings", "settings",
                        "stop_reason"}
    assert out["prompt"] == PROMPT and out["n_prompt_tokens"] == len(PROMPT)  # character level
    assert out["n_tokens"] == len(out["tokens"]) == 30 and out["stop_reason"] == "max_tokens"
    assert all(isinstance(t, int) for t in out["tokens"])
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    assert tokenizer.decode(out["tokens"], skip_special_tokens=False) == out["text"]
    timings = out["timings"]
    assert 0 < timings["time_to_first_token_s"] <= timings["total_s"] and timings["tokens_per_s"] > 0
    assert out["settings"]["temperature"] == 0 and out["settings"]["max_tokens"] == 30
    # The same generation as the plain output, which prints prompt + text.
    plain = run_script("inference_gguf.py", "--query", PROMPT, "--temperature", "0", "--max_tokens", 30,
                       cwd=folder)
    assert plain.stdout == PROMPT + out["text"] + "\n"
    assert "prompt 16 tokens, first token in" in plain.stderr and "CPU" in plain.stderr


def test_stop_strings_end_the_text_before_them(trained):
    folder, _ = trained
    [full] = generate_json(folder, "--query", PROMPT, "--temperature", "0", "--max_tokens", 120)
    text = full["text"]
    stop = text[40:43]                        # a string the greedy text is sure to reach
    [stopped] = generate_json(folder, "--query", PROMPT, "--temperature", "0", "--max_tokens", 120,
                              "--stop", "no such words", "--stop", stop)
    assert stopped["stop_reason"] == "stop_string"
    assert stopped["text"] == text[:text.find(stop)] and stop not in stopped["text"]
    plain = run_script("inference_gguf.py", "--query", PROMPT, "--temperature", "0", "--max_tokens", 120,
                       "--stop", stop, cwd=folder)
    assert plain.stdout == PROMPT + text[:text.find(stop)] + "\n"
    assert "ended by stop string" in plain.stderr


@hsettings(max_examples=1000, deadline=None)
@given(text=st.text(alphabet="ab\nc", max_size=40), stops=st.lists(st.text(alphabet="ab\n", min_size=1,
       max_size=4), max_size=3), cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_strings_stream_the_same_text_however_it_is_split(text, stops, cuts):
    pieces, last = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        pieces.append(text[last:cut])
        last = max(last, cut)
    filt = StopStrings(stops)
    shown = ""
    for piece in pieces:
        shown += filt.feed(piece)
        if filt.hit is not None:
            break
    if filt.hit is None:
        shown += filt.flush()
    # Generation stops as soon as a stop string is complete: the first one to end wins (of those
    # ending together, the one starting first), and the text before it is what was shown.
    matches = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    assert shown == (text[:min(matches)[1]] if matches else text)


# ---------------------------------------------------------------------------- sampling

def test_min_p_one_keeps_only_the_likeliest_token(trained):
    folder, _ = trained
    greedy = generate_json(folder, "--query", PROMPT, "--temperature", "0", "--max_tokens", 60)[0]
    hot = generate_json(folder, "--query", PROMPT, "--temperature", "1.5", "--min_p", "1", "--seed", 1,
                        "--max_tokens", 60)[0]
    assert hot["text"] == greedy["text"]
    wild = generate_json(folder, "--query", PROMPT, "--temperature", "1.5", "--seed", 1,
                         "--max_tokens", 60)[0]
    assert wild["text"] != greedy["text"]


def test_repeat_penalty_follows_its_definition(gpt2_trained):
    """Greedy with a repeat penalty through llama.cpp (an F32 file) equals the same rule applied
    by hand to the PyTorch model's logits (GPT-2's: the context rule by hand too), and differs
    from plain greedy."""
    folder, _ = gpt2_trained
    config = load_config(str(folder / "model_config.pth"))
    model = load_trained_model(str(folder / "trained_model.pth"), config)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    path = folder / "penalty.F32.gguf"
    write_gguf_atomic(model, tokenizer, str(path), "F32")
    n_new, penalty, last_n = 60, 1.3, 16

    history = encode(tokenizer, PROMPT)
    window = fit_prompt(history, config["block_size"])
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([window]))[0][0, -1].clone()
            for token in set(history[-last_n:]):   # seen recently: odds divided by the penalty
                logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
            token = int(logits.argmax())
            history.append(token)
            window = slide(window + [token], config["block_size"])
    expected = history[len(PROMPT):]

    args = ["--gguf_path", path, "--query", PROMPT, "--temperature", "0", "--max_tokens", n_new]
    got = generate_json(folder, *args, "--repeat_penalty", penalty, "--repeat_last_n", last_n)[0]
    assert got["tokens"] == expected
    assert generate_json(folder, *args)[0]["tokens"] != expected
    # PyTorch generate() applies the same penalty through the same sampler.
    pytorch = model.generate(torch.tensor([encode(tokenizer, PROMPT)]), n_new, temperature=0,
                             repeat_penalty=penalty, repeat_last_n=last_n)
    assert pytorch[0, len(PROMPT):].tolist() == expected


def test_sampler_filters():
    logits = np.array([4.0, 3.9, 1.0, 0.5, -2.0], dtype=np.float32)

    def draws(settings, n=300):
        sampler = Sampler(settings)
        return {sampler(logits) for _ in range(n)}

    assert draws(Settings(temperature=1.0, min_p=0.5)) == {0, 1}        # p(2)/p(0) = e^-3 < 0.5
    assert draws(Settings(temperature=1.0, top_k=1)) == {0}
    assert draws(Settings(temperature=1.0, top_p=0.4)) == {0}           # p(0) alone is 0.5
    assert draws(Settings(temperature=5.0)) == {0, 1, 2, 3, 4}
    penalized = Sampler(Settings(temperature=0, repeat_penalty=1.1))
    penalized.start([0])                                                  # token 0 was just seen
    assert penalized(logits) == 1
    assert Sampler(Settings(temperature=0))(logits) == 0
    seeded = [Sampler(Settings(temperature=1.0, seed=3)) for _ in range(2)]
    assert [seeded[0](logits) for _ in range(50)] == [seeded[1](logits) for _ in range(50)]


# ------------------------------------------------------------------------- start-up

def test_inference_starts_without_torch():
    """The llama.cpp path never imports torch: inference_gguf.py, the context rule, the sampler,
    the prompt loop's commands, the flag table and the runtime."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import inference_gguf; "
            "import custom_llm.context, custom_llm.flags, custom_llm.sampling, custom_llm.commands, "
            "custom_llm.runtime; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------- PyTorch KV cache

def test_kv_cache_generate_equals_generate_without_cache(gpt2_trained):
    """GPT-2's cached generate() follows the context rule as re-reading every window does (the
    windowed model's cache: test_windowed.py)."""
    folder, _ = gpt2_trained
    config = load_config(str(folder / "model_config.pth"))
    model = load_trained_model(str(folder / "trained_model.pth"), config)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    block = config["block_size"]

    def without_cache(idx, n):   # the context rule, re-reading the whole window for every token
        out, windows = idx, [fit_prompt(row.tolist(), block) for row in idx]
        with torch.no_grad():
            for _ in range(n):
                nxt = model(torch.tensor(windows))[0][:, -1, :].argmax(-1, keepdim=True)
                out = torch.cat((out, nxt), dim=1)
                windows = [slide(w + [t], block) for w, t in zip(windows, nxt[:, 0].tolist())]
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # hundreds of tiny forwards: threads only add overhead
    try:
        check_kv_cache(model, tokenizer, block, without_cache)
    finally:
        torch.set_num_threads(threads)


def check_kv_cache(model, tokenizer, block, without_cache):
    short = torch.tensor([encode(tokenizer, PROMPT)])
    long = torch.tensor([encode(tokenizer, "The old clock watches every window. " * 3)])  # > block
    pair = torch.tensor([encode(tokenizer, "The sailor"), encode(tokenizer, "My sister!")])
    for idx in (short, long, pair):
        expected = without_cache(idx, 4 * block)      # slides several times
        assert torch.equal(model.generate(idx, 4 * block, temperature=0), expected)
    # Random weights: near-uniform logits, where any numerical difference would flip a choice.
    torch.manual_seed(0)
    model.apply(model._init_weights)
    assert torch.equal(model.generate(short, 3 * block, temperature=0), without_cache(short, 3 * block))


# ---------------------------------------------------------------- quantization report

def test_report_numbers_match_a_direct_computation(trained, text_file):
    folder, _ = trained
    result = run_script("convert_to_gguf.py", "--quant_type", "Q8_0,Q4_0", "--gguf_output", "report.gguf",
                        "--output_dir", "hf_report", "--eval_tokens", 3000, cwd=folder)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The single-type check lines are still there, one per file.
    for name in ("report.gguf", "report.gguf.Q8_0.gguf", "report.gguf.Q4_0.gguf"):
        assert re.search(rf"^Check {re.escape(name)}: .*tokenization (\d+)/\1 strings equal", out, re.M), out
    rows = {m.group(1): m.groups() for m in re.finditer(
        r"^\| (PyTorch \(F32\)|F16|Q8_0|Q4_0) \|([^|]*)\|([^|]*)\| (\S+) \|([^|]*)\|([^|]*)\|$", out, re.M)}
    assert set(rows) == {"PyTorch (F32)", "F16", "Q8_0", "Q4_0"}, out

    # Direct computation: held-out tokens, windows of block_size, cross-entropy, exp.
    config = load_config(str(folder / "model_config.pth"))
    model = load_trained_model(str(folder / "trained_model.pth"), config)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    held_out = prepare(str(text_file), tokenizer=tokenizer).val  # what training held out
    assert len(held_out) == int(len(encode(tokenizer, text_file.read_text(encoding="utf-8"))) * VALIDATION_FRACTION)
    tokens = held_out.tolist()[:3000]
    block = config["block_size"]
    starts = range(0, len(tokens) - 1, block)
    losses, reference_top1 = [], []
    with torch.no_grad():
        for s in starts:
            x, y = tokens[s:s + block], tokens[s + 1:s + block + 1]
            logits = model(torch.tensor([x[:len(y)]]))[0][0]
            losses.append(F.cross_entropy(logits, torch.tensor(y), reduction="sum").item())
            reference_top1 += logits.argmax(-1).tolist()
    n_predicted = len(tokens) - 1
    reference = math.exp(sum(losses) / n_predicted)
    assert f"on {n_predicted:,} tokens" in out
    assert float(rows["PyTorch (F32)"][3]) == pytest.approx(reference, rel=2e-4)

    for kind, path in (("Q8_0", "report.gguf.Q8_0.gguf"), ("Q4_0", "report.gguf.Q4_0.gguf")):
        gguf = GGUFModel(str(folder / path), logits_all=True)
        nll, top1 = 0.0, []
        for s in starts:
            x, y = tokens[s:s + block], tokens[s + 1:s + block + 1]
            logits = gguf.logits(x[:len(y)]).astype(np.float64)
            log_probs = logits - logits.max(-1, keepdims=True)
            log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
            nll -= log_probs[np.arange(len(y)), y].sum()
            top1 += logits.argmax(-1).tolist()
        perplexity = math.exp(nll / n_predicted)
        agreement = np.mean(np.array(top1) == np.array(reference_top1))
        _, size, bpw, shown, ratio, agree = rows[kind]
        assert float(shown) == pytest.approx(perplexity, rel=2e-4)
        assert float(ratio) == pytest.approx(perplexity / reference, abs=2e-4)
        assert float(agree.strip().rstrip("%")) == pytest.approx(100 * agreement, abs=0.01)


def test_report_without_held_out_text_says_what_to_do(trained, tmp_path):
    folder, _ = trained
    line = one_line_error(run_script("convert_to_gguf.py", "--report", "--eval_text", tmp_path / "none.txt",
                                     "--gguf_output", "x.gguf", "--output_dir", "hf_x", cwd=folder), 2)
    assert "none.txt" in line
