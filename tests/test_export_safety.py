"""convert_to_gguf.py replaces nothing until every file it wrote passed its check; a kill at any
moment leaves files that load; folders are swapped without a moment with no folder; what a killed
run left behind is cleaned; the quantization fallbacks are read from the file written."""

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO, run_script

import convert_to_gguf
import custom_llm.atomic as atomic
import custom_llm.export as export
import custom_llm.gpt2 as gpt2
import custom_llm.isolated as isolated
import custom_llm.windowed as windowed
from custom_llm.checks import HARD_STRINGS
from custom_llm.errors import UserError
from custom_llm.export import HFExport, block_size, fallback_tensors, quantize_atomic, tensor_types, write_gguf_atomic
from custom_llm.model import build_model
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import build_char_tokenizer, encode

EXPORTS = ["hf_model", "model.gguf", "model.gguf.Q4_0.gguf"]


def copy_of_pipeline(trained, folder):
    """The trained pipeline's files, exports included, in a folder of the test's own."""
    source, _ = trained
    for name in ["model_config.pth", "tokenizer.json", "trained_model.pth", *EXPORTS]:
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
        copy(source / name, folder / name)
    return folder


def contents(folder) -> dict:
    """Every export's bytes, file by file."""
    found = {}
    for name in EXPORTS:
        path = folder / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            found[str(file.relative_to(folder))] = file.read_bytes()
    return found


def leftovers(folder) -> list:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def convert_in_process(folder, monkeypatch, *args):
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["convert_to_gguf.py", *args])
    convert_to_gguf.main()


# ------------------------------------------------------------------- failed checks

def swap_two_tokens(real):
    """The GGUF's vocabulary with two ordinary tokens swapped: llama.cpp then tokenizes differently."""
    def tampered(tokenizer):
        tokens, merges, eot = real(tokenizer)
        i, j = tokens.index("a"), tokens.index("e")
        tokens[i], tokens[j] = tokens[j], tokens[i]
        return tokens, merges, eot
    return tampered


def shift_one_tensor(real):
    """GPT-2's Hugging Face export with one weight changed: its logits differ from the model's."""
    def tampered(model):
        state = real(model)
        state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + 1.0
        return state
    return tampered


def shift_one_hf_tensor(real):
    """The windowed model's Hugging Face export with one weight changed (the GGUF's unchanged)."""
    def tampered(model, reader):
        tensors = real(model, reader)
        if reader == "hf":
            tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
        return tensors
    return tampered


@pytest.mark.parametrize("pipeline,module,tamper,where,reason", [
    ("trained", export, "vocab_and_merges", swap_two_tokens, "tokenizes"),
    ("trained", windowed, "exported_tensors", shift_one_hf_tensor, "logits differ"),
    ("gpt2_trained", gpt2, "hf_state_dict", shift_one_tensor, "logits differ"),
])
def test_a_failed_check_replaces_nothing(request, tmp_path, monkeypatch, pipeline, module, tamper, where, reason):
    folder = copy_of_pipeline(request.getfixturevalue(pipeline), tmp_path)
    before = contents(folder)
    monkeypatch.setattr(module, tamper, where(getattr(module, tamper)))
    with pytest.raises(UserError) as failure:
        convert_in_process(folder, monkeypatch)
    assert reason in str(failure.value) and "nothing was replaced" in str(failure.value)
    assert contents(folder) == before          # the previous files, byte for byte
    assert leftovers(folder) == []             # and no temporary file or folder


@pytest.mark.parametrize("how", ["SIGSEGV", "SIGABRT"])
def test_llama_cpp_dying_in_a_check_is_one_line_and_replaces_nothing(trained, tmp_path, monkeypatch, how):
    """llama.cpp's part of the check runs in a child process; here that child dies by a signal, as
    llama.cpp does on a failed assert (SIGABRT) or a backend's segfault (SIGSEGV)."""
    folder = copy_of_pipeline(trained, tmp_path)
    before = contents(folder)
    dies = [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{how})"]
    monkeypatch.setattr(isolated, "child_command", lambda *args: dies)
    with pytest.raises(UserError) as failure:
        convert_in_process(folder, monkeypatch)
    message = str(failure.value)
    assert f"llama.cpp crashed ({how}) while checking model.gguf" in message, message
    assert "nothing was replaced" in message and "\n" not in message
    assert contents(folder) == before          # the rule of a failed check: the previous files, byte for byte
    assert leftovers(folder) == []


def test_the_llama_cpp_check_runs_without_torch(trained, tmp_path):
    """The child that reads a GGUF back imports llama.cpp and numpy, never torch."""
    import pickle
    folder, _ = trained
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.write_bytes(pickle.dumps({"path": str(folder / "model.gguf"), "strings": ["a b"], "windows": [[1, 2]]}))
    child = subprocess.run([sys.executable, "-X", "importtime", "-m", "custom_llm.isolated", "read_back",
                            str(inputs), str(outputs)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in child.stderr.splitlines() if "|" in line}
    assert "llama_cpp" in imported and "torch" not in imported
    tokens, logits = pickle.loads(outputs.read_bytes())["result"]
    assert len(tokens) == 1 and logits[0].shape[0] == 2


def test_a_passing_run_replaces_every_file_and_cleans_what_a_killed_run_left(trained, tmp_path, monkeypatch):
    folder = copy_of_pipeline(trained, tmp_path)
    before = {name: os.stat(folder / name).st_ino for name in EXPORTS}
    (folder / ".hf_model.abcd1234.tmp").mkdir()            # a killed run's half-written folder
    (folder / ".hf_model.abcd1234.tmp" / "model.safetensors").write_bytes(b"half")
    (folder / ".hf_model.efgh5678.old").mkdir()            # and a previous folder set aside
    (folder / ".model.gguf.ijkl9012.tmp").write_bytes(b"half")
    (folder / ".model.gguf.source-f32.mnop3456.tmp").write_bytes(b"half")
    convert_in_process(folder, monkeypatch)
    for name in EXPORTS:   # each replaced by a new file (the same model gives the same bytes)
        assert os.stat(folder / name).st_ino != before[name], name
    assert leftovers(folder) == []
    HFExport(str(folder / "hf_model"))


# ------------------------------------------------------------------------- kills

def test_a_kill_during_convert_leaves_files_that_load(trained, tmp_path):
    folder = copy_of_pipeline(trained, tmp_path)
    # Kill when each output is being written (its temporary appears), and once a little after.
    moments = [(".hf_model.", 0.0), (".model.gguf.", 0.0), (".model.gguf.Q4_0.gguf.", 0.0),
               (".model.gguf.Q4_0.gguf.", 0.3)]
    for prefix, delay in moments:
        process = subprocess.Popen([sys.executable, str(REPO / "convert_to_gguf.py")], cwd=folder,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not any(name.startswith(prefix) for name in os.listdir(folder)):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "no temporary appeared"
            time.sleep(0.005)
        time.sleep(delay)
        process.kill()
        process.communicate()
        # Whatever the moment, each export is a whole file (the previous one or the new one).
        HFExport(str(folder / "hf_model")).logits([1, 2, 3])
        model = GGUFModel(str(folder / "model.gguf"), logits_all=True)
        assert np.isfinite(model.logits([1, 2, 3])).all()
        del model
        assert len(tensor_types(str(folder / "model.gguf.Q4_0.gguf"))[0]) > 0
    result = run_script("convert_to_gguf.py", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert leftovers(folder) == []
    generated = run_script("inference_gguf.py", "--query", "The", "--max_tokens", 20, cwd=folder)
    assert generated.returncode == 0 and generated.stdout.startswith("The"), generated.stderr


# ------------------------------------------------------------------ folder swaps

def exchange_works(folder) -> bool:
    a, b = folder / "probe-a", folder / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return atomic._exchange(str(a), str(b))
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


def write_folder(path, text):
    with atomic.atomic_dir(str(path)) as tmp:
        with open(os.path.join(tmp, "content.txt"), "w") as f:
            f.write(text)


def test_a_folder_is_swapped_with_no_moment_without_it(tmp_path):
    if not exchange_works(tmp_path):
        pytest.skip("this file system cannot swap two names in one step")
    target = tmp_path / "hf_model"
    write_folder(target, "first")
    missing, done = [], threading.Event()

    def watch():
        while not done.is_set():
            if not os.path.isdir(target):
                missing.append(time.time())

    watcher = threading.Thread(target=watch)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # let the watcher run between any two steps of a swap
    watcher.start()
    try:
        for i in range(200):
            write_folder(target, f"version {i}")
    finally:
        done.set()
        watcher.join()
        sys.setswitchinterval(switch)
    assert not missing, f"no folder at {target} {len(missing)} times"
    assert (target / "content.txt").read_text() == "version 199"
    assert os.listdir(tmp_path) == ["hf_model"]


def test_a_folder_swap_without_the_one_step_swap(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)   # e.g. macOS, Windows
    target = tmp_path / "hf_model"
    write_folder(target, "first")
    write_folder(target, "second")
    assert (target / "content.txt").read_text() == "second"
    assert os.listdir(tmp_path) == ["hf_model"]


def test_a_folder_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    # Killed between the two renames of a swap without the one-step swap: the folder is set aside.
    (tmp_path / ".hf_model.abcd1234.old").mkdir()
    (tmp_path / ".hf_model.abcd1234.old" / "content.txt").write_text("previous")
    (tmp_path / ".hf_model.efgh5678.tmp").mkdir()
    atomic.remove_stale_temporaries(str(tmp_path / "hf_model"))
    assert (tmp_path / "hf_model" / "content.txt").read_text() == "previous"
    assert os.listdir(tmp_path) == ["hf_model"]


# --------------------------------------------------------------- quantization

def tiny_model(n_embd):
    tokenizer = build_char_tokenizer(list("abcdefghij ."))
    config = {"vocab_size": tokenizer.get_vocab_size(), "n_embd": n_embd, "n_head": 4, "n_layer": 2,
              "block_size": 32, "dropout": 0.0}
    return build_model(config).eval(), tokenizer


@pytest.mark.parametrize("n_embd,quant_type,expected", [
    (64, "Q4_K_M", {"token_embd.weight", "output.weight", "blk.0.attn_qkv.weight", "blk.0.attn_output.weight",
                    "blk.0.ffn_up.weight", "blk.1.attn_qkv.weight", "blk.1.attn_output.weight",
                    "blk.1.ffn_up.weight"}),
    (64, "Q4_0", set()),
    (48, "Q4_0", {"token_embd.weight", "output.weight", "blk.0.attn_qkv.weight", "blk.0.attn_output.weight",
                  "blk.0.ffn_up.weight", "blk.1.attn_qkv.weight", "blk.1.attn_output.weight",
                  "blk.1.ffn_up.weight"}),
    (256, "Q4_K_M", set()),
])
def test_fallbacks_are_read_from_the_written_file(tmp_path, n_embd, quant_type, expected):
    model, tokenizer = tiny_model(n_embd)
    source, path = str(tmp_path / "f32.gguf"), str(tmp_path / "q.gguf")
    write_gguf_atomic(model, tokenizer, source, "F32")
    fallbacks = quantize_atomic(source, path, quant_type)
    assert set(fallbacks) == expected
    types, _ = tensor_types(path)
    for name, kind in fallbacks.items():
        assert types[name] == kind and kind not in (quant_type, "F32")
    assert fallbacks == fallback_tensors(path, quant_type)
    assert block_size(quant_type) == (256 if "_K" in quant_type else 32)
    # What llama.cpp quantized still tokenizes like the model.
    gguf_model = GGUFModel(path)
    assert all(gguf_model.tokenize(s) == encode(tokenizer, s) for s in HARD_STRINGS)
