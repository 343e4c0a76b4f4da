"""The windowed model (custom_llm/windowed.py): its graph, and its two exports read back by
transformers and by llama.cpp (llama-cpp-python), at lengths well past the window.

Tiny models with a window of 16 tokens. llama.cpp runs in child processes (it can abort the whole
process): a crash there is a test failure that names what llama.cpp said.
"""

import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_text
from custom_llm import windowed
from custom_llm.checks import compare_answers
from custom_llm.export import add_gguf_tokenizer
from custom_llm.tokenizer import END_OF_TEXT, build_char_tokenizer, decode, encode
from custom_llm.windowed import (GGUF_ARCH, WindowedModel, add_gguf_metadata, add_gguf_tensors,
                                 count_parameters, gguf_layers, hf_model)

W = 16   # block_size: the window
TINY = {"n_embd": 64, "n_head": 4, "n_layer": 4, "block_size": W, "dropout": 0.0}
LONG = 40 * W   # 640 positions: more than one of llama.cpp's 512-token micro-batches
F32_CACHE, F16_CACHE = 0, 1   # ggml types of llama.cpp's KV cache (f16 is llama.cpp's default)
# Largest logit error accepted, relative to the largest logit: llama.cpp computes in float32 with
# an f32 cache (measured 6e-6 here), an f16 cache rounds every key and value (measured 1.1e-3).
TOLERANCE = {F32_CACHE: 1e-4, F16_CACHE: 5e-3}


def relative_error(got, expected) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(expected)).max() / np.abs(expected).max())


# ------------------------------------------------------------------------------ models

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread: per-operation overhead dominates, and a
    second thread that waits for a busy core made a training step 10x slower on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(sorted(set(make_text(200))))


def random_model(vocab_size, **overrides):
    """Random weights, large enough (std 0.3) that every position's logits depend on its context."""
    torch.manual_seed(0)
    model = WindowedModel({**TINY, "vocab_size": vocab_size, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A model trained for a few seconds on text, on sequences of four windows (as the windowed
    model is meant to train), so its greedy choices are decided by its context with clear margins."""
    torch.manual_seed(0)
    data = torch.tensor(encode(tokenizer, make_text(400)))
    model = WindowedModel({**TINY, "n_layer": 2, "vocab_size": tokenizer.get_vocab_size()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = 4 * W
    for _ in range(150):
        starts = torch.randint(0, len(data) - T - 1, (16,))
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 2.0, f"the tiny model did not learn its text (loss {loss.item():.2f})"
    return model.eval()


def ids(model, n, seed=1):
    return torch.randint(0, model.config["vocab_size"] - 1, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, tokens) -> np.ndarray:
    return model(tokens)[0][0].float().numpy()


# ------------------------------------------------------------------------- the graph

def test_config_defaults_and_parameter_count():
    config = {**TINY, "vocab_size": 300}
    model = WindowedModel(config)
    assert model.num_parameters() == count_parameters(config)
    assert model.config["n_ff"] % 32 == 0 and model.config["rope_theta"] == 10000.0
    assert WindowedModel({**config, "n_ff": 96}).config["n_ff"] == 96
    with pytest.raises(ValueError, match="block_size"):
        WindowedModel({k: v for k, v in config.items() if k != "block_size"})
    with pytest.raises(ValueError, match="divisible"):
        WindowedModel({**config, "n_head": 3})


@pytest.mark.parametrize("cached", [False, True], ids=["one pass", "token by token"])
def test_the_window_is_block_size_tokens_including_the_token_itself(cached):
    """With one layer, position t sees tokens t-W+1..t and nothing earlier."""
    model = random_model(300, n_layer=1)
    t = 3 * W + 5
    base = ids(model, t + 1)

    def logits_at_t(tokens):
        if not cached:
            return logits_of(model, tokens)[t]
        cache = model.new_cache()
        with torch.no_grad():
            for i in range(t + 1):
                row = model(tokens[:, i:i + 1], kv_cache=cache)[0][0, -1]
                assert len(cache) <= W - 1     # the cache keeps only what the window needs
        return row.numpy()

    expected = logits_at_t(base)
    for position, seen in ((t - W, False), (t - W + 1, True), (t, True)):
        changed = base.clone()
        changed[0, position] = (changed[0, position] + 1) % 299
        moved = np.abs(logits_at_t(changed) - expected).max()
        assert (moved > 1e-3) == seen, (position, moved)


def test_a_long_sequence_in_one_pass_equals_the_cached_path():
    """Training reads sequences of several windows in one pass; generation reads one token at a
    time from a cache (or a prompt in pieces): both are the same model."""
    model = random_model(300, n_layer=2)
    tokens = ids(model, 8 * W + 5)
    full = logits_of(model, tokens)
    for piece in (1, 7, W + 3):
        cache = model.new_cache()
        with torch.no_grad():
            parts = [model(tokens[:, s:s + piece], kv_cache=cache)[0][0] for s in range(0, tokens.size(1), piece)]
        assert relative_error(torch.cat(parts).numpy(), full) < 1e-5, piece


@pytest.mark.parametrize("T", [2 * W + 1, 3 * W, 5 * W + 7])
def test_blocked_attention_equals_one_band_mask(T):
    """Long sequences attend block by block: the same as one (T, T) band mask."""
    q, k, v = torch.randn(3, 2, 4, T, 8, generator=torch.Generator().manual_seed(T))
    positions = torch.arange(T)
    band = windowed.window_mask(positions, positions, W)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
    assert torch.allclose(windowed.blocked_attention(q, k, v, W), expected, atol=1e-6)


def test_loss_is_cross_entropy_that_skips_targets_of_minus_one():
    model = random_model(300, n_layer=1)
    x, y = ids(model, 3 * W, seed=2), ids(model, 3 * W, seed=3)
    logits, loss = model(x, y)
    masked = y.clone()
    masked[0, :W] = -1
    expected = torch.nn.functional.cross_entropy(logits[0, W:], y[0, W:])
    assert torch.allclose(model(x, masked)[1], expected) and not torch.allclose(loss, expected)


def test_generate_continues_as_the_training_forward_reads():
    """Greedy generation far past the window picks, at every step, the argmax of the one-pass
    forward over everything before; sampling with a seed repeats itself."""
    model = random_model(300, n_layer=2)
    prompt = ids(model, W + 3)
    out = model.generate(prompt, 5 * W, temperature=0)
    assert out.shape == (1, prompt.size(1) + 5 * W) and torch.equal(out[:, :prompt.size(1)], prompt)
    expected = logits_of(model, out[:, :-1]).argmax(-1)[prompt.size(1) - 1:]
    assert out[0, prompt.size(1):].tolist() == expected.tolist()
    sampled = [model.generate(prompt, 30, temperature=1.0, top_k=50, seed=s) for s in (7, 7, 8)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


# ------------------------------------------------------------------------ transformers

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, trained, tokenizer):
    folder = tmp_path_factory.mktemp("hf")
    hf_model(trained, end_of_text=tokenizer.token_to_id(END_OF_TEXT)).save_pretrained(folder)
    return folder


def load_hf(folder):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def test_transformers_loads_the_folder_offline_and_computes_the_same_logits(hf_folder, trained):
    config = json.loads((hf_folder / "config.json").read_text())
    assert config["model_type"] == "olmo3" and config["sliding_window"] == W
    assert config["layer_types"] == ["sliding_attention"] * trained.config["n_layer"]
    hf = load_hf(hf_folder)
    tokens = ids(trained, 8 * W)
    with torch.no_grad():
        got = hf(tokens).logits[0].numpy()
    assert relative_error(got, logits_of(trained, tokens)) < 1e-5


def test_transformers_greedy_generation_equals_ours(hf_folder, trained, tokenizer):
    """transformers' own generate() (its sliding-window cache) against ours, far past the window."""
    hf = load_hf(hf_folder)
    prompt = torch.tensor([encode(tokenizer, "The miller ")])
    ours = trained.generate(prompt, 8 * W, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=8 * W, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert theirs[0].tolist() == ours[0].tolist()


# ------------------------------------------------------------------------------ GGUF

def write_gguf(path, model, tokenizer, writer_view=lambda w: w):
    """An F32 GGUF of model: the module's metadata and tensors, and a minimal gpt2 (byte-level
    BPE) tokenizer from the project's vocabulary and merges. writer_view lets a test change what
    the module writes (an older front end's view of the file)."""
    import gguf
    writer = gguf.GGUFWriter(str(path), arch=GGUF_ARCH)
    writer.add_name("windowed-test")
    add_gguf_metadata(writer_view(writer), model.config)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_gguf_tokenizer(writer, tokenizer, None)
    add_gguf_tensors(writer, model, "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


class WithoutPatternKey:
    """A GGUF writer that leaves out sliding_window_pattern: the file as a llama.cpp that does
    not read the key sees it (it windows olmo2's layers il % 4 < 3 and runs the rest in full)."""

    def __init__(self, writer):
        self.writer = writer

    def add_sliding_window_pattern(self, value):
        pass

    def __getattr__(self, name):
        return getattr(self.writer, name)


def llama_child():
    """Run in a child process (python -c, without torch): the llama.cpp jobs listed in the JSON
    file argv[1]; their arrays go to the .npz file argv[2]."""
    import json
    import sys

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    def logits(path, tokens, n_ctx, cache, verbose=False):
        """One pass over all tokens, as Llama.eval does it (batches of n_batch 512)."""
        llm = Llama(model_path=path, n_ctx=n_ctx, type_k=cache, type_v=cache, logits_all=True, verbose=verbose)
        llm.eval(tokens)
        return {"logits": np.array(llm.scores[:len(tokens)], dtype=np.float32), "n_ctx": llm.n_ctx()}

    def fill(path, tokens, n_ctx, cache, mode, window, keep=0, swa_full=True):
        """Token by token past the context, as the low-level API lets a front end do it when the
        cache is full: "shift" as the context shift of llama-cli, llama-server and Ollama (keep the
        first `keep` positions, drop half of the rest, move the others down), "remove" drops only
        what the window no longer needs, "none" does nothing. swa_full: windowed layers cache
        n_ctx positions (llama-cpp-python's default) or about the window (llama.cpp's tools')."""
        llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, type_k=cache, type_v=cache, swa_full=swa_full,
                    verbose=False)
        ctx = llm._ctx.ctx
        memory, n_ctx, n_vocab = llama_cpp.llama_get_memory(ctx), llama_cpp.llama_n_ctx(ctx), llm.n_vocab()
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        rows, events, n_past = [], [], 0
        for i, token in enumerate(tokens):
            if n_past == n_ctx and mode == "shift":
                discard = (n_past - keep) // 2
                llama_cpp.llama_memory_seq_rm(memory, 0, keep, keep + discard)
                llama_cpp.llama_memory_seq_add(memory, 0, keep + discard, n_past, -discard)
                n_past -= discard
                events.append(i)
            elif n_past >= n_ctx and mode == "remove":
                llama_cpp.llama_memory_seq_rm(memory, 0, 0, n_past - window + 1)
                events.append(i)
            batch.n_tokens, batch.token[0], batch.pos[0] = 1, token, n_past
            batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 0, 1
            status = llama_cpp.llama_decode(ctx, batch)
            if status != 0:
                return {"logits": np.array(rows, dtype=np.float32), "failed_at": i, "status": status,
                        "events": events, "n_ctx": n_ctx}
            rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0), shape=(n_vocab,)).copy())
            n_past += 1
        return {"logits": np.array(rows, dtype=np.float32), "failed_at": -1, "events": events, "n_ctx": n_ctx}

    def greedy(path, prompt, max_tokens, n_ctx=None):
        """llama-cpp-python's Llama at its defaults (but n_ctx, where given), as its users call it."""
        llm = Llama(model_path=path, verbose=False, **({} if n_ctx is None else {"n_ctx": n_ctx}))
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
        return {"text": np.array(out["choices"][0]["text"]), "n_ctx": llm.n_ctx(),
                "prompt_tokens": np.array(llm.tokenize(prompt.encode(), add_bos=False))}

    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    answers = {}
    for n, (job, kwargs) in enumerate(jobs):
        result = {"logits": logits, "fill": fill, "greedy": greedy}[job](**kwargs)
        answers.update({f"{n}.{key}": np.asarray(value) for key, value in result.items()})
    np.savez(sys.argv[2], **answers)


def run_llama(tmp_path, jobs):
    """[each job's answers] from one child process; a crash is a failure naming what llama.cpp said."""
    jobs_path, out_path = tmp_path / "jobs.json", tmp_path / "answers.npz"
    jobs_path.write_text(json.dumps(jobs))
    code = inspect.getsource(llama_child) + "\nllama_child()\n"
    child = subprocess.run([sys.executable, "-c", code, str(jobs_path), str(out_path)], capture_output=True,
                           text=True, errors="replace", timeout=300, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    said = [line for line in child.stderr.splitlines() if line.strip()]
    if child.returncode != 0 or not out_path.exists():
        pytest.fail(f"llama.cpp child ended with status {child.returncode}: " + " | ".join(said[-3:]))
    with np.load(out_path) as answers:
        found = [{} for _ in jobs]
        for key in answers.files:
            n, name = key.split(".", 1)
            found[int(n)][name] = answers[key]
    return found, child.stderr


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, model, tokenizer):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf", model, tokenizer)


@pytest.fixture(scope="module")
def long_ids(model):
    return ids(model, LONG)


@pytest.fixture(scope="module")
def llama_logits(tmp_path_factory, gguf_file, long_ids):
    """llama.cpp's logits of LONG tokens in one pass, per (n_ctx, cache type); with its log."""
    settings = [(n_ctx, cache) for n_ctx in (0, 2048) for cache in (F32_CACHE, F16_CACHE)]
    jobs = [("logits", {"path": gguf_file, "tokens": long_ids[0].tolist(), "n_ctx": n_ctx, "cache": cache,
                        "verbose": i == 0}) for i, (n_ctx, cache) in enumerate(settings)]
    answers, log = run_llama(tmp_path_factory.mktemp("child"), jobs)
    return dict(zip(settings, answers)), log


def test_llama_cpp_windows_every_layer_of_ours(llama_logits, model):
    log = llama_logits[1]
    is_swa = {int(layer): flag == "1" for layer, flag in re.findall(r"layer\s+(\d+) assigned to device \S+, is_swa = (\d)", log)}
    plan = gguf_layers(model.config["n_layer"])
    assert [is_swa[block] for block, layer in enumerate(plan) if layer is not None] == [True] * model.config["n_layer"]
    assert is_swa[len(plan) - 1] is False        # the identity block that keeps the full cache non-empty
    assert re.search(rf"n_swa\s+= {W}\b", log)


@pytest.mark.parametrize("n_ctx", [0, 2048])
@pytest.mark.parametrize("cache", [F32_CACHE, F16_CACHE], ids=["f32 cache", "f16 cache"])
def test_llama_cpp_logits_equal_pytorch_far_past_the_window(llama_logits, model, long_ids, n_ctx, cache):
    answer = llama_logits[0][(n_ctx, cache)]
    expected = logits_of(model, long_ids)
    assert int(answer["n_ctx"]) == (n_ctx or windowed.GGUF_CONTEXT)
    for length in (8 * W, LONG):
        assert relative_error(answer["logits"][:length], expected[:length]) < TOLERANCE[cache], length


def test_the_logit_check_would_see_a_window_one_token_off(llama_logits, model, long_ids):
    """The tolerance is far tighter than what a window of W - 1 or W + 1 would change."""
    answer = llama_logits[0][(0, F16_CACHE)]["logits"]
    for window in (W - 1, W + 1):
        other = WindowedModel({**model.config, "block_size": window}).eval()
        other.load_state_dict(model.state_dict())
        assert relative_error(answer, logits_of(other, long_ids)) > 20 * TOLERANCE[F16_CACHE], window


def test_a_llama_cpp_that_ignores_the_pattern_key_runs_the_same_model(tmp_path, model, tokenizer, long_ids,
                                                                      monkeypatch):
    """Without sliding_window_pattern, llama.cpp runs olmo2's blocks 3, 7, ... in full: the identity
    blocks sit there. A file without them would run our layer 3 in full: a different model."""
    with_identity = write_gguf(tmp_path / "a.gguf", model, tokenizer, WithoutPatternKey)
    monkeypatch.setattr(windowed, "gguf_layers", lambda n_layer: list(range(n_layer)))
    without_identity = write_gguf(tmp_path / "b.gguf", model, tokenizer, WithoutPatternKey)
    jobs = [("logits", {"path": path, "tokens": long_ids[0].tolist(), "n_ctx": 0, "cache": F32_CACHE})
            for path in (with_identity, without_identity)]
    (a, b), _ = run_llama(tmp_path, jobs)
    expected = logits_of(model, long_ids)
    assert relative_error(a["logits"], expected) < TOLERANCE[F32_CACHE]
    assert relative_error(b["logits"][:W], expected[:W]) < TOLERANCE[F32_CACHE]     # the same within one window
    assert relative_error(b["logits"], expected) > 20 * TOLERANCE[F16_CACHE]        # not past it


@pytest.mark.parametrize("mode, keep, swa_full", [("shift", 0, False), ("shift", 4, False), ("shift", 0, True),
                                                   ("remove", 0, True), ("remove", 0, False)],
                         ids=["shift (llama-cli, llama-server)", "shift keeping 4 (Ollama)",
                              "shift (llama-cpp-python)", "remove (llama-cpp-python)", "remove (llama.cpp tools)"])
def test_llama_cpp_past_a_full_context(tmp_path, gguf_file, model, long_ids, mode, keep, swa_full):
    """n_ctx 256 and 640 tokens: past n_ctx a decode fails unless the front end frees cells; a
    context shift or removing what the window no longer needs keeps the logits the trained
    model's, position by position (rotary positions are relative: shifted keys are turned back)."""
    jobs = [("fill", {"path": gguf_file, "tokens": long_ids[0].tolist(), "n_ctx": 256, "cache": F32_CACHE,
                      "mode": mode, "window": W, "keep": keep, "swa_full": swa_full})]
    if mode == "remove":
        jobs.append(("fill", {"path": gguf_file, "tokens": long_ids[0].tolist(), "n_ctx": 256, "cache": F32_CACHE,
                              "mode": "none", "window": W, "swa_full": swa_full}))
    answers, _ = run_llama(tmp_path, jobs)
    answer = answers[0]
    assert int(answer["failed_at"]) == -1 and len(answer["events"]) > 0
    assert relative_error(answer["logits"], logits_of(model, long_ids)) < TOLERANCE[F32_CACHE]
    if len(answers) > 1:
        assert int(answers[1]["failed_at"]) == int(answers[1]["n_ctx"]) == 256


def test_llama_cpp_python_writes_our_greedy_text_for_1000_tokens(tmp_path, trained, tokenizer):
    """The F32 GGUF in llama-cpp-python's own Llama, as its users call it: at its defaults (n_ctx
    512, which cuts max_tokens to the room the prompt leaves) and at the file's context (n_ctx 0:
    4,096), 1,000 tokens, 62 windows; PyTorch's greedy text in both. Where they part, it must be
    at a near tie (two choices within the f16 cache's tolerance: float rounding picks either)."""
    path = write_gguf(tmp_path / "trained.gguf", trained, tokenizer)
    prompt, n = "The miller ", 1000
    answers, _ = run_llama(tmp_path, [("greedy", {"path": path, "prompt": prompt, "max_tokens": n}),
                                      ("greedy", {"path": path, "prompt": prompt, "max_tokens": n, "n_ctx": 0})])
    prompt_ids = encode(tokenizer, prompt)
    new = trained.generate(torch.tensor([prompt_ids]), n, temperature=0)[0, len(prompt_ids):].tolist()
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eot in new:   # llama.cpp stops at the end of text
        new = new[:new.index(eot)]
    for answer, n_ctx in zip(answers, (512, windowed.GGUF_CONTEXT)):
        assert answer["prompt_tokens"].tolist() == prompt_ids and int(answer["n_ctx"]) == n_ctx
        expected = new[:min(n, n_ctx - len(prompt_ids))]
        got = encode(tokenizer, str(answer["text"]))   # the char tokenizer: a character is a token
        assert len(expected) > 2 * W and len(got) == len(expected)
        assert compare_answers(trained, prompt_ids, expected, got, TOLERANCE[F16_CACHE]) in ("equal", "near tie")
    assert len(expected) == n or eot in new, "1,000 tokens at the file's context"


def test_transformers_gguf_reader(tmp_path, gguf_file, model, long_ids):
    """transformers reads some GGUF architectures itself; where it reads olmo2, its logits must be
    ours. transformers 5.24 does not: it says so, which is what is checked then."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    folder, name = os.path.split(gguf_file)
    if GGUF_ARCH not in GGUF_SUPPORTED_ARCHITECTURES:
        with pytest.raises(ValueError, match=f"architecture {GGUF_ARCH} is not supported"):
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
        pytest.skip(f"transformers' GGUF reader has no {GGUF_ARCH} architecture (it refuses the file)")
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True).eval()
    with torch.no_grad():
        got = hf(long_ids[:, :8 * W]).logits[0].numpy()
    assert relative_error(got, logits_of(model, long_ids[:, :8 * W])) < TOLERANCE[F32_CACHE]
