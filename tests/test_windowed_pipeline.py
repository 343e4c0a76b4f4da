"""The windowed architecture through the four stages: llm_model.py --architecture windowed, training
on rows of several windows, the export checks far past the block, and generation that reads on
with llama.cpp's own window (docs/windowed.md)."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import (TINY, assert_resume_ends_as_uninterrupted, assert_same_greedy_text, one_line_error,
                      run_pipeline, run_script)
from test_chat import CHAT_TINY, chat_file, make_conversations, write_jsonl  # noqa: F401  (chat_file: a fixture)

from custom_llm import data, gguf_keys, isolated
from custom_llm.architectures import sequence_length
from custom_llm.corpus import find_documents
from custom_llm.export import write_gguf_atomic
from custom_llm.files import load_config, load_trained_model
from custom_llm.memory import WORKSPACE_BYTES, training_memory_bytes
from custom_llm.model import count_parameters
from custom_llm.runtime import GGUFModel, check_gguf
from custom_llm.tokenizer import encode, load_tokenizer

WINDOWED = ["--architecture", "windowed", *TINY]     # block 32: rows of 4 windows are 128 tokens
QUICK = ["--batch_size", "8", "--learning_rate", "0.003", "-y"]
PROMPT = "The miller mends"


@pytest.fixture(scope="session")
def windowed_trained(tmp_path_factory, text_file):
    """A folder where the whole pipeline ran once with a windowed model."""
    folder = tmp_path_factory.mktemp("windowed_pipeline")
    return folder, run_pipeline(folder, [*WINDOWED, "-y"], ["--dataset_path", text_file, "--max_steps", 150, *QUICK])


def load(folder):
    config = load_config(str(folder / "model_config.pth"))
    return config, load_trained_model(str(folder / "trained_model.pth"), config), \
        load_tokenizer(str(folder / "tokenizer.json"))


# ------------------------------------------------------------------------------ stage 1

def test_the_architecture_is_a_flag_and_the_questions_keep_their_order(tmp_path):
    answers = "char\n64\n4\n2\n32\n0.0\n"   # vocabulary, n_embd, n_head, n_layer, block_size, dropout
    result = run_script("llm_model.py", cwd=tmp_path, input=answers)      # the default architecture
    assert result.returncode == 0, result.stderr
    config = load_config(str(tmp_path / "model_config.pth"))
    assert (config["architecture"], config["train_windows"], config["n_embd"], config["block_size"]) == \
        ("windowed", 4, 64, 32)
    assert "Architecture: windowed: rotary positions and a window of 32 tokens" in result.stdout
    assert "rows of 4 windows (128 tokens)" in result.stdout
    for windows in (2, 1):   # 1 is saved too: the architecture's default would take its place
        assert run_script("llm_model.py", "--train_windows", str(windows), *WINDOWED, "-y", cwd=tmp_path).returncode == 0
        config = load_config(str(tmp_path / "model_config.pth"))
        assert (config["train_windows"], sequence_length(config)) == (windows, windows * config["block_size"])
    gpt2 = run_script("llm_model.py", "--architecture", "gpt2", *TINY, "-y", cwd=tmp_path)
    assert gpt2.returncode == 0 and "Architecture: gpt2: learned positions, exact within 32 tokens" in gpt2.stdout
    config = load_config(str(tmp_path / "model_config.pth"))
    assert config["architecture"] == "gpt2" and "train_windows" not in config   # as before the choice


@pytest.mark.parametrize("args,words", [
    (["--architecture", "windowed", "--n_embd", "36", "--n_head", "4"], ["head size", "9", "odd", "rotary"]),
    (["--architecture", "gpt2", "--train_windows", "2"], ["--train_windows", "gpt2", "one window"]),
    (["--architecture", "olmo"], ["--architecture", "windowed"]),
    (["--architecture", "windowed", "--train_windows", "0"], ["--train_windows"]),
])
def test_what_cannot_work_is_refused_in_one_line(tmp_path, args, words):
    line = one_line_error(run_script("llm_model.py", *args, "-y", cwd=tmp_path), 2)
    assert all(word in line for word in words), line
    assert not (tmp_path / "model_config.pth").exists()


def test_an_odd_head_size_piped_is_refused_too(tmp_path):
    result = run_script("llm_model.py", "--architecture", "windowed", cwd=tmp_path, input="char\n36\n4\n2\n32\n0\n")
    assert "odd" in one_line_error(result, 2)


# ------------------------------------------------------------------------------ stage 2

def test_training_rows_are_several_windows_long(text_file):
    corpus = find_documents(str(text_file))
    generator = np.random.default_rng(0)
    for config, length in (({"block_size": 32}, 32),
                           ({"architecture": "windowed", "block_size": 32}, 128),
                           ({"architecture": "windowed", "block_size": 32, "train_windows": 3}, 96)):
        assert sequence_length(config) == length
        dataset = data.prepare(corpus, None, {**config, "tokenizer": "char"})
        for split in ("train", "val"):
            inputs, targets = dataset.batch(split, dataset.draw(split, generator, 5))
            assert inputs.shape == targets.shape == (5, length)
            assert torch.equal(inputs[:, 1:], targets[:, :-1])   # one text, shifted by one


def test_the_memory_estimate_counts_the_rows_tokens():
    shape = {"vocab_size": 100, "n_embd": 64, "n_head": 4, "n_layer": 2, "block_size": 32, "dropout": 0.0}

    def activations(config):
        return training_memory_bytes(config, 3, base_bytes=0) - WORKSPACE_BYTES - 16 * count_parameters(config)
    windowed = {**shape, "architecture": "windowed"}
    one_window = activations({**windowed, "train_windows": 1})
    assert one_window > activations(shape) > 0        # more kept per token than GPT-2's graph
    assert activations(windowed) == 4 * one_window     # rows of 4 windows: 4 times the tokens
    assert activations({**windowed, "train_windows": 8}) == 8 * one_window


def test_conversations_pack_into_rows_of_several_windows(tmp_path):
    chats = find_documents(str(write_jsonl(tmp_path / "chats.jsonl", make_conversations(60))))
    for config, length in (({"block_size": 64}, 64), ({"architecture": "windowed", "block_size": 64}, 256)):
        dataset = data.prepare(chats, None, {**config, "tokenizer": "char"})
        inputs, targets = dataset.batch("train", dataset.draw("train", np.random.default_rng(0), 3))
        assert inputs.shape == targets.shape == (3, length)
        assert dataset.train.windows.shape[1] == length + 1
    # Four windows hold about four times the conversations of one.
    one = data.prepare(chats, None, {"block_size": 64, "tokenizer": "char"})
    assert len(dataset.train.windows) * 3 <= len(one.train.windows)


def test_training_says_its_rows_and_counts_their_tokens(windowed_trained):
    folder, results = windowed_trained
    out = results["train"].stdout
    assert "effective batch 8 sequences of 128 tokens (4 windows of 32) (1,024 tokens)" in out, out
    config = load_config(str(folder / "model_config.pth"))
    assert (config["architecture"], config["train_windows"]) == ("windowed", 4)
    log = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.3


def test_a_stopped_windowed_run_resumes_to_the_uninterrupted_result(tmp_path, text_file):
    plan = ["--dataset_path", text_file, "--max_steps", 50, "--eval_interval", 10, "--seed", 5,
            "--dtype", "float32", "--optimizer", "adamw", *QUICK]
    interrupted, step, resumed = assert_resume_ends_as_uninterrupted(tmp_path, WINDOWED, plan)
    assert 0 < step < 50 and f"at step {step}" in resumed.stdout
    # A config asking for other rows is refused: the checkpoint's steps were of another length.
    config = torch.load(interrupted / "model_config.pth", weights_only=True)
    torch.save({**config, "train_windows": 2}, interrupted / "model_config.pth")
    line = one_line_error(run_script("train_llm.py", "--resume", cwd=interrupted))
    assert "rows of 128 tokens" in line and "64" in line


# ------------------------------------------------------------------------------ stage 3

def test_convert_compares_logits_over_eight_blocks_and_the_greedy_text(windowed_trained):
    folder, results = windowed_trained
    out = results["convert"].stdout
    for name, tolerance in (("hf_model/", 2e-3), ("model.gguf", 1e-2)):
        line = next(line for line in out.splitlines() if line.startswith(f"Check {name}:"))
        assert "(in passes of up to 256 tokens, 8 blocks)" in line, line
        assert float(re.search(r"max relative logit error (\S+)", line).group(1)) < tolerance
    greedy = next(line for line in out.splitlines() if line.startswith("Greedy check model.gguf:"))
    assert "300 tokens" in greedy and "the same text as PyTorch" in greedy, greedy
    assert not any(line.startswith("Greedy check model.gguf.Q4_0") for line in out.splitlines())
    facts = check_gguf(str(folder / "model.gguf"))
    assert facts.windowed and facts.trained_context == 32
    assert "olmo2" in gguf_keys.READABLE_ARCHITECTURES


def test_a_windowed_chat_model_passes_the_chat_check(tmp_path, chat_file):
    assert run_script("llm_model.py", "--architecture", "windowed", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    train = run_script("train_llm.py", "--dataset_path", chat_file, "--max_steps", 60, "--batch_size", "8",
                       "--eval_interval", "20", "--eval_batches", "2", "-y", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "sequences of 256 tokens" in train.stdout
    convert = run_script("convert_to_gguf.py", cwd=tmp_path)
    assert convert.returncode == 0, convert.stdout + convert.stderr
    said = convert.stdout
    for name in ("hf_model/", "model.gguf"):
        line = next(line for line in said.splitlines() if line.startswith(f"Chat check {name}:"))
        assert "3/3 held-out conversations formatted id for id as in PyTorch" in line, line
        assert "greedy answers 3/3 equal" in line or "near tie" in line, line
    # The conversation is kept past the block of 64 (a GPT-2 model drops its oldest turns there).
    turns = "Spell kadu\nReverse bimo\nSpell toka\nReverse lemu\n"
    chat = run_script("inference_gguf.py", "--gguf_path", "model.gguf", "--chat", "--temperature", "0",
                      "--max_tokens", "12", "--json", cwd=tmp_path, input=turns)
    assert chat.returncode == 0, chat.stderr
    answers = [json.loads(line) for line in chat.stdout.splitlines()]
    assert len(answers) == 4 and "no longer fit" not in chat.stderr
    assert len(answers[-1]["messages"]) == 8 and answers[-1]["n_prompt_tokens"] > 64
    assert_ten_turns_as_in_pytorch(tmp_path)


def assert_ten_turns_as_in_pytorch(folder, max_tokens=12):
    """Ten questions, each reader keeping its own answers: create_chat_completion at its default
    context and inference_gguf.py --chat give PyTorch's answers turn by turn, far past the block,
    until a near tie (two tokens within the F16 tolerance) lets float rounding part them."""
    from custom_llm.chat_format import ChatFormat, end_ids, template_of_config
    from custom_llm.checks import compare_answers
    from custom_llm.export import GGUF
    config, model, tokenizer = load(folder)
    template = template_of_config(config, tokenizer)
    chat, answer_ends = ChatFormat(tokenizer, template), end_ids(tokenizer, template)
    questions = [f"{'Spell' if i % 2 else 'Reverse'} {word}" for i, word in enumerate(
        ["kadu", "bimo", "toka", "lemu", "sivo", "rapi", "nuke", "fola", "dime", "gaso"])]
    [by_completion], n_ctx = isolated.converse(str(folder / "model.gguf"), [questions], max_tokens)
    assert n_ctx == 512
    script = run_script("inference_gguf.py", "--chat", "--temperature", "0", "--max_tokens", max_tokens, "--json",
                        cwd=folder, input="".join(q + "\n" for q in questions))
    assert script.returncode == 0, script.stderr
    by_script = [json.loads(line)["text"] for line in script.stdout.splitlines()]
    for reader, answers in (("create_chat_completion", by_completion), ("inference_gguf.py --chat", by_script)):
        assert len(answers) == len(questions) and None not in answers, reader   # none refused: all fit 512
        messages = []
        for turn, (question, got) in enumerate(zip(questions, answers)):
            messages.append({"role": "user", "content": question})
            prompt = chat.encode(messages, add_generation_prompt=True)[0].tolist()
            expected = model.generate(torch.tensor([prompt]), max_tokens, temperature=0)[0, len(prompt):].tolist()
            ends = [i for i, t in enumerate(expected) if t in answer_ends]
            expected = expected[:ends[0] + 1] if ends else expected
            got_ids = encode(tokenizer, got) + (expected[-1:] if ends else [])
            verdict = compare_answers(model, prompt, expected, got_ids, GGUF.tolerance)
            assert verdict in ("equal", "near tie"), (reader, turn, question, got, tokenizer.decode(expected))
            if verdict == "near tie":
                break
            messages.append({"role": "assistant", "content": got})
        if verdict == "equal":
            assert len(prompt) > 3 * 64, reader     # the tenth turn is read far past the block of 64


# ------------------------------------------------------------------------------ stage 4

@pytest.fixture(scope="session")
def f32_gguf(windowed_trained):
    folder, _ = windowed_trained
    config, model, tokenizer = load(folder)
    path = folder / "check.F32.gguf"
    write_gguf_atomic(model, tokenizer, str(path), "F32")
    return path


def test_inference_writes_pytorchs_greedy_text_far_past_the_block(windowed_trained, f32_gguf):
    folder, _ = windowed_trained
    expected = assert_same_greedy_text(folder, PROMPT, 300, gguf=f32_gguf.name)   # past the block 9 times
    assert len(expected) > 8 * 32


def test_a_long_prompt_is_read_whole_and_nothing_is_said_of_sliding(windowed_trained, f32_gguf):
    folder, _ = windowed_trained
    config, model, tokenizer = load(folder)
    prompt = "The old clock watches every window. " * 20    # 720 characters: more than one batch of 512
    result = run_script("inference_gguf.py", "--gguf_path", f32_gguf.name, "--query", prompt, "--max_tokens", 40,
                        "--temperature", "0", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "sees only" not in result.stderr
    ids = encode(tokenizer, prompt)
    expected = model.generate(torch.tensor([ids]), 40, temperature=0)[0].tolist()
    assert result.stdout == tokenizer.decode(expected, skip_special_tokens=False) + "\n"


@pytest.mark.parametrize("prompt", [PROMPT, "The old clock watches every window. " * 17], ids=["short", "long"])
def test_generation_never_aborts_past_the_context_and_stays_pytorchs(windowed_trained, f32_gguf, prompt):
    """A context of 256 cells, a prompt of up to 612 tokens and 800 new ones: llama.cpp would fail
    its decode ("failed to find a memory slot") at 256 unless the positions out of the window are
    removed first, and the long prompt is read in batches that fit."""
    folder, _ = windowed_trained
    config, model, tokenizer = load(folder)
    gguf = GGUFModel(str(f32_gguf), n_ctx=256)
    assert gguf.windowed and gguf.llm.n_ctx() == 256 and gguf.context == 256
    ids = encode(tokenizer, prompt)
    got = []
    for token in gguf.generate(ids, 800, lambda logits: int(np.argmax(logits))):
        got.append(token)
    assert len(got) == 800 or got[-1] in gguf.stop_tokens
    expected = model.generate(torch.tensor([ids]), len(got), temperature=0)[0, len(ids):].tolist()
    assert got == expected


def test_a_windowed_gguf_opens_its_files_context_and_says_so(windowed_trained):
    folder, _ = windowed_trained
    gguf = GGUFModel(str(folder / "model.gguf"))
    assert gguf.block_size == 32 and gguf.context == gguf.llm.n_ctx() == 4096
