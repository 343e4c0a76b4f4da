"""The four stages end to end through their command lines, and what each one leaves behind."""

import re

import numpy as np
import pytest
import torch
from conftest import TINY, Terminal, one_line_error, run_script

from custom_llm.checks import HARD_STRINGS
from custom_llm.export import FORMATS, quantize_atomic, write_gguf_atomic
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import encode, load_tokenizer
from custom_llm.files import load_config, load_trained_model
from llm_model import build_model  # the model a saved config describes

PROMPT = "The miller mends"


def pytorch_greedy(folder, prompt, max_new_tokens):
    config = load_config(str(folder / "model_config.pth"))
    model = load_trained_model(str(folder / "trained_model.pth"), config)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    out = model.generate(torch.tensor([encode(tokenizer, prompt)]), max_new_tokens, temperature=0)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


# ------------------------------------------------------------------------------ train

def test_training_output_and_files(trained, text_file):
    folder, results = trained
    out = results["train"].stdout
    assert re.search(r"Training on cpu with \d+\.\d+M parameters", out)
    epochs = re.findall(r"Epoch (\d+)/(\d+) ends at step \d+: training loss (\d+\.\d+), validation loss (\d+\.\d+)",
                        out)
    assert len(epochs) >= 2
    assert float(epochs[-1][2]) < float(epochs[0][2])  # the loss falls

    config = torch.load(folder / "model_config.pth", weights_only=True)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    text = text_file.read_text(encoding="utf-8")
    assert config["vocab_size"] == tokenizer.get_vocab_size() < 10000  # written back
    assert len(encode(tokenizer, text)) == len(text)  # character level
    # The documented way to load the weights works as written.
    model = build_model(torch.load(folder / "model_config.pth"))
    model.load_state_dict(torch.load(folder / "trained_model.pth"))


def test_training_text_errors(tmp_path):
    assert run_script("llm_model.py", *TINY, "-y", cwd=tmp_path).returncode == 0
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 100)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (tmp_path / "folder").mkdir()
    cases = {"empty.txt": "empty", "short.txt": "too short", "latin1.txt": "byte offset 3",
             "image.png": "binary", "folder": "folder", "missing.txt": "does not exist"}
    for name, reason in cases.items():
        line = one_line_error(run_script("train_llm.py", "--dataset_path", name, "-y", cwd=tmp_path))
        assert reason in line and name in line, line
    assert not (tmp_path / "trained_model.pth").exists()
    ok = run_script("train_llm.py", "--dataset_path", "latin1.txt", "--encoding", "latin-1",
                    "--max_steps", "2", "-y", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_default_text_is_made_when_the_user_has_none(tmp_path):
    assert run_script("llm_model.py", *TINY, "-y", cwd=tmp_path).returncode == 0
    result = run_script("train_llm.py", "--max_steps", "2", "-y", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "made for you" in result.stdout
    assert len((tmp_path / "input.txt").read_text(encoding="utf-8")) > 500_000


# ----------------------------------------------------------------------------- export

def test_convert_checks_its_own_output(trained):
    folder, results = trained
    out = results["convert"].stdout
    for name in ("model.gguf", "model.gguf.Q4_0.gguf"):
        line = next(line for line in out.splitlines() if line.startswith(f"Check {name}:"))
        assert f"tokenization {len(HARD_STRINGS)}/{len(HARD_STRINGS)} strings equal" in line
        assert "bits/weight" in line
    f16_error = float(re.search(r"Check model.gguf:.*max relative logit error (\S+)", out).group(1))
    assert f16_error < 1e-2


def test_every_export_format_is_written_and_checked(trained):
    """convert_to_gguf.py writes each entry of export.FORMATS and checks it against the model."""
    folder, results = trained
    out = results["convert"].stdout
    for export_format in FORMATS:
        assert (folder / export_format.default).exists()
        line = next(line for line in out.splitlines() if line.startswith(f"Check {export_format.default}"))
        assert f"tokenization {len(HARD_STRINGS)}/{len(HARD_STRINGS)} strings equal" in line, line
        error = float(re.search(r"max relative logit error (\S+)", line).group(1))
        assert error < export_format.tolerance


def test_hf_export_loads_offline_and_matches(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, _ = trained
    hf_model = AutoModelForCausalLM.from_pretrained(folder / "hf_model", local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(folder / "hf_model", local_files_only=True)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    for text in HARD_STRINGS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == encode(tokenizer, text)
    model = load_trained_model(str(folder / "trained_model.pth"), load_config(str(folder / "model_config.pth")))
    ids = torch.tensor([encode(tokenizer, "The sailor paints the boats. " * 2)[:32]])
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, model(ids)[0], atol=1e-4)


@pytest.mark.parametrize("dtype,tolerance", [("F32", 2e-3), ("F16", 1e-2)])
def test_unquantized_gguf_greedy_text_equals_pytorch(gpt2_trained, dtype, tolerance):
    """A GPT-2 model's text slides at the block in the GGUF as in PyTorch, token for token (the
    windowed model's far past the block: test_windowed_pipeline.py)."""
    folder, _ = gpt2_trained
    config = load_config(str(folder / "model_config.pth"))
    model = load_trained_model(str(folder / "trained_model.pth"), config)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    path = folder / f"check.{dtype}.gguf"
    write_gguf_atomic(model, tokenizer, str(path), dtype)

    ids = encode(tokenizer, "A sailor counts seven apples. The café owner forgets")[:32]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    got = GGUFModel(str(path), logits_all=True).logits(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() < tolerance

    n_new = 5 * config["block_size"]  # well past the context: the window slides several times
    result = run_script("inference_gguf.py", "--gguf_path", path, "--query", PROMPT,
                        "--temperature", "0", "--max_tokens", n_new, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout == pytorch_greedy(folder, PROMPT, n_new) + "\n"  # the script adds one newline


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_0", "Q4_K_M", "Q5_1", "Q2_K"])
def test_quantized_files_load_and_generate(trained, quant_type):
    folder, _ = trained
    path = folder / f"model.{quant_type}.gguf"
    quantize_atomic(str(folder / "model.gguf"), str(path), quant_type)
    # In a subprocess: a crash in llama.cpp (e.g. AMX repacking) must fail the test, not kill pytest.
    result = run_script("inference_gguf.py", "--gguf_path", path, "--query", PROMPT,
                        "--max_tokens", 80, "--seed", 3, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and len(result.stdout) > len(PROMPT) + 20
    assert "tokens/s" in result.stderr and "peak RSS" in result.stderr


def test_unknown_quant_type_lists_valid_ones(trained):
    folder, _ = trained
    line = one_line_error(run_script("convert_to_gguf.py", "--quant_type", "Q9_9", cwd=folder), 2)
    assert "Q9_9" in line and "Q4_K_M" in line and "Q8_0" in line


# -------------------------------------------------------------------------- inference

def test_seeded_sampling_is_reproducible(trained):
    folder, _ = trained
    runs = [run_script("inference_gguf.py", "--query", PROMPT, "--seed", 7, "--temperature", "0.9",
                       "--top_k", 20, "--top_p", "0.9", cwd=folder).stdout for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].startswith(PROMPT)


def test_empty_and_overlong_prompts(gpt2_trained):
    """A GPT-2 model sees the last block of an overlong prompt, and says so (a windowed one reads
    it whole: test_windowed_pipeline.py)."""
    folder, _ = gpt2_trained
    empty = run_script("inference_gguf.py", "--query", "", "--max_tokens", 30, "--temperature", "0",
                       cwd=folder)
    assert empty.returncode == 0 and len(empty.stdout.strip()) > 0
    long_prompt = "The old clock watches every window. " * 10  # 360 characters, context is 32
    result = run_script("inference_gguf.py", "--query", long_prompt, "--max_tokens", 40,
                        "--temperature", "0", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(long_prompt) and "sees only its last 32" in result.stderr


@pytest.mark.parametrize("args,reason", [
    (["--max_tokens", "0"], "--max_tokens"),
    (["--max_tokens", "-5"], "--max_tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top_p", "1.5"], "--top_p"),
    (["--top_p", "0"], "--top_p"),
    (["--top_k", "0"], "--top_k"),
    (["--gguf_path", "nothing-here.gguf"], "not found"),
    (["--gguf_path", "tokenizer.json"], "not a GGUF"),
    (["--min_p", "1.5"], "--min_p"),
    (["--repeat_penalty", "0"], "--repeat_penalty"),
    (["--repeat_last_n", "0"], "--repeat_last_n"),
    (["--stop", ""], "--stop"),
    (["--seed", "-1"], "--seed"),
    (["--top_k", "abc"], "--top_k"),
    (["--temperature", "inf"], "--temperature"),
])
def test_inference_bad_arguments(trained, args, reason):
    folder, _ = trained
    line = one_line_error(run_script("inference_gguf.py", "--query", "x", *args, cwd=folder), 2)
    assert reason in line


def test_prompt_loop_from_a_pipe(trained):
    folder, _ = trained
    result = run_script("inference_gguf.py", "--max_tokens", 15, cwd=folder,
                        input="First prompt\nSecond prompt\n\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert "First prompt" in result.stdout and "Second prompt" in result.stdout
    assert "never read" not in result.stdout
    assert result.stderr.count("tokens/s") == 2


def test_prompt_loop_at_a_terminal(trained):
    folder, _ = trained
    term = Terminal("inference_gguf.py", "--max_tokens", 20, cwd=folder)
    term.read_until("> ")
    term.send("Hello there\n")
    term.read_until("tokens/s")
    term.read_until("> ")
    term.send("\x04")  # Ctrl-D ends the loop
    assert term.wait() == 0
    assert "Hello there" in term.output


def test_gpu_flag_without_gpu_backend_runs_on_cpu(trained):
    import llama_cpp
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build has a GPU backend")
    folder, _ = trained
    result = run_script("inference_gguf.py", "--query", "Hi", "--use_gpu", "--max_tokens", 5, cwd=folder)
    assert result.returncode == 0 and "no GPU backend" in result.stderr
