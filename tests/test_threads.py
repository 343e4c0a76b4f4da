"""llama.cpp's thread count: the rule (model size, cores, other programs' load -> threads), the
--threads flag reaching llama.cpp over it, the checks of convert_to_gguf.py using it, and the CPU
share of the resource line for generations shorter than the OS's CPU-time tick."""

import os
import sys

import llama_cpp
import pytest
import torch
from hypothesis import given, strategies as st

from custom_llm import isolated, runtime
from custom_llm.export import write_gguf_atomic
from custom_llm.model import build_model
from custom_llm.resources import (BYTES_PER_THREAD, ResourceUse, choose_threads, llama_threads,
                                  weight_bytes_per_token)
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import build_char_tokenizer

MB = 2**20
DEMO = MB // 2                      # the README's demo model at Q4_0: about 0.5 MB per token
GPT2_Q4 = 55 * MB                   # a 99M-parameter model at Q4_0


# ---------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("weight_bytes, cores, busy, threads", [
    (DEMO, 2, 0.0, 1),               # small: one thread, even on an idle machine
    (DEMO, 64, 0.0, 1),
    (15 * MB, 2, 0.0, 1),            # still under a millisecond a token on one core
    (GPT2_Q4, 2, 0.0, 2),            # large, idle: every core
    (GPT2_Q4, 2, 0.05, 2),           # a shell's blip leaves a core free
    (GPT2_Q4, 2, 0.3, 1),            # a third of a core used elsewhere: that core is not free
    (GPT2_Q4, 2, 1.0, 1),
    (GPT2_Q4, 2, 2.0, 1),            # a training run on both cores: one thread, never none
    (GPT2_Q4, 2, 3.5, 1),            # more runnable work than cores
    (GPT2_Q4, 16, 0.0, 3),           # at least BYTES_PER_THREAD of work for each thread
    (200 * MB, 16, 0.0, 12),
    (200 * MB, 16, 6.0, 10),
    (4000 * MB, 16, 0.0, 16),
])
def test_threads_follow_model_size_and_free_cores(weight_bytes, cores, busy, threads):
    assert choose_threads(weight_bytes, cores, busy) == threads


@given(st.integers(0, 2**40), st.integers(1, 256), st.floats(0, 512), st.floats(0, 512))
def test_threads_stay_within_the_cores_and_fall_as_the_load_rises(weight_bytes, cores, busy, more):
    threads = choose_threads(weight_bytes, cores, busy)
    assert 1 <= threads <= cores
    assert choose_threads(weight_bytes, cores, busy + more) <= threads
    assert choose_threads(weight_bytes * 2, cores, busy) >= threads


# ---------------------------------------------------------------- reaching llama.cpp

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
    torch.manual_seed(0)
    model = build_model({"n_embd": 32, "n_head": 4, "n_layer": 1, "block_size": 32, "dropout": 0.0,
                              "vocab_size": tokenizer.get_vocab_size()}).eval()
    path = tmp_path_factory.mktemp("threads") / "tiny.gguf"
    write_gguf_atomic(model, tokenizer, str(path), "F32")
    return str(path)


def threads_in_llama_cpp(model: GGUFModel) -> tuple:
    return llama_cpp.llama_n_threads(model._ctx), llama_cpp.llama_n_threads_batch(model._ctx)


def run_inference(monkeypatch, *args) -> GGUFModel:
    """inference_gguf.py's main() with these flags, in this process; the model it loaded."""
    import inference_gguf
    loaded = []

    class Recorded(GGUFModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            loaded.append(self)

    monkeypatch.setattr(inference_gguf, "GGUFModel", Recorded)
    monkeypatch.setattr(sys, "argv", ["inference_gguf.py", *args])
    inference_gguf.main()
    return loaded[0]


def test_the_threads_flag_overrides_the_rule_in_llama_cpp(tiny_gguf, monkeypatch, capsys):
    assert llama_threads(tiny_gguf) == 1
    model = run_inference(monkeypatch, "--gguf_path", tiny_gguf, "--query", "ab", "--max_tokens", "2",
                          "--threads", "3")
    assert threads_in_llama_cpp(model) == (3, 3)
    model = run_inference(monkeypatch, "--gguf_path", tiny_gguf, "--query", "ab", "--max_tokens", "2")
    assert threads_in_llama_cpp(model) == (1, 1)
    assert "CPU" in capsys.readouterr().err


def test_without_the_flag_every_llama_cpp_load_uses_the_rule(tiny_gguf, monkeypatch):
    monkeypatch.setattr(runtime, "llama_threads", lambda path: 3)
    assert threads_in_llama_cpp(GGUFModel(tiny_gguf)) == (3, 3)
    assert threads_in_llama_cpp(GGUFModel(tiny_gguf, n_threads=2)) == (2, 2)

    # convert_to_gguf.py's chat check loads the file through llama-cpp-python's Llama itself.
    import custom_llm.resources
    monkeypatch.setattr(custom_llm.resources, "llama_threads", lambda path: 3)
    seen = []

    class Recorded(llama_cpp.Llama):
        def __init__(self, *a, **k):
            seen.append((k.get("n_threads"), k.get("n_threads_batch")))
            super().__init__(*a, **k)

    monkeypatch.setattr(llama_cpp, "Llama", Recorded)
    assert isolated._chat(tiny_gguf, [], []) == []
    assert seen == [(3, 3)]


def test_weights_read_per_token_leave_out_the_tables_read_by_row(tiny_gguf):
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(tiny_gguf).tensors}
    assert "output.weight" in tensors
    assert weight_bytes_per_token(tiny_gguf) == (sum(tensors.values()) - tensors["position_embd.weight"]
                                                 - tensors["token_embd.weight"])
    assert weight_bytes_per_token(tiny_gguf) < BYTES_PER_THREAD


# ------------------------------------------------------------------- the resource line

def test_cpu_share_of_short_generations_is_at_most_every_core(tiny_gguf):
    """Generations of a millisecond or less, far below the 10 ms tick of per-process CPU times:
    one tick counted in one of them read as 1000% or more."""
    model = GGUFModel(tiny_gguf, n_threads=os.cpu_count())
    prompt = model.tokenize("ab")
    shares = []
    for _ in range(100):
        with ResourceUse() as use:
            for _ in model.generate(prompt, 16, lambda logits: int(logits.argmax())):
                pass
        shares.append(use.cpu_percent)
    assert max(shares) <= 100 * os.cpu_count(), shares
    assert min(shares) >= 0
