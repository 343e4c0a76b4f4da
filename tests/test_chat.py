"""Chat models: conversations (JSONL) in, answers out. The one template, the answers-only loss, the
packing, the checks of the JSONL lines, the three starting points (scratch, trained weights, a
GPT-2 folder), --minutes and --resume, and the exports' chat check against PyTorch."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, assert_resume_ends_as_uninterrupted, one_line_error, run_pipeline, run_script
from test_gpt2 import save_tiny_gpt2

from custom_llm.chat_format import (CHAT_TEMPLATE, END_OF_TURN, TURN_START, ChatFormat, render, render_pieces,
                             with_chat_tokens)
from custom_llm.chat_data import ChatDataset, PackedWindows, pack, read_conversations, split_held_out
from custom_llm.chat_layouts import conversation
from custom_llm.corpus import find_documents
from custom_llm.data import IGNORED
from custom_llm.model import build_model, grow_vocabulary
from custom_llm.tokenizer import END_OF_TEXT, build_char_tokenizer, load_tokenizer, train_bpe_tokenizer

CHAT_TINY = [*TINY, "--block_size", "64"]   # room for a whole exchange
QUICK = ["--batch_size", "16", "--eval_interval", "20", "--eval_batches", "2", "-y"]


def made_up_word(rng):
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def make_conversations(n=400, seed=0) -> list:
    """Short exchanges with exact answers (spelling, reversing), some with a system message, some
    in the prompt/completion shorthand."""
    rng, lines = random.Random(seed), []
    for i in range(n):
        word = made_up_word(rng)
        if i % 2:
            lines.append({"prompt": f"Reverse {word}", "completion": word[::-1]})
        else:
            messages = [{"role": "user", "content": f"Spell {word}"}, {"role": "assistant", "content": "-".join(word)}]
            if i % 10 == 0:
                messages.insert(0, {"role": "system", "content": "Answer briefly."})
            lines.append({"messages": messages})
    return lines


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", make_conversations())


@pytest.fixture(scope="session")
def chat_trained(tmp_path_factory, chat_file):
    """A tiny char-level chat model trained from scratch on the conversations, and exported."""
    folder = tmp_path_factory.mktemp("chat_model")
    return folder, run_pipeline(folder, [*CHAT_TINY, "-y"], ["--dataset_path", chat_file, "--max_steps", 150,
                                                              "--max_epochs", 1000, *QUICK])


def assert_the_chat_check_passes(folder):
    """convert_to_gguf.py in folder succeeds, and formats held-out conversations as PyTorch does in
    the HF export and the GGUF."""
    convert = run_script("convert_to_gguf.py", cwd=folder)
    assert convert.returncode == 0, convert.stderr
    said = convert.stdout + convert.stderr
    for name in ("hf_model/", "model.gguf"):
        assert f"Chat check {name}: 3/3 held-out conversations formatted id for id" in said, said


def char_chat_tokenizer(text="abcdefghijklmnopqrstuvwxyz -<|>\n"):
    return with_chat_tokens(build_char_tokenizer(text))


# ------------------------------------------------------------------ the format

def test_the_template_is_chatml_and_training_formats_with_it():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    text = render(messages)
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nyo<|im_end|>\n")
    assert render(messages[:2], add_generation_prompt=True).endswith("<|im_start|>user\nhi<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    tokenizer = char_chat_tokenizer()
    ids, _ = ChatFormat(tokenizer).encode(messages)
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == text   # the template's text, exactly


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_targets_are_the_answers_and_their_end_of_turn_only(kind):
    messages = [{"role": "user", "content": "Spell kado"}, {"role": "assistant", "content": "k-a-d-o"},
                {"role": "user", "content": "Reverse it"}, {"role": "assistant", "content": "odak"}]
    base = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz -") if kind == "char" else \
        train_bpe_tokenizer(iter(["Spell kado and Reverse it, k-a-d-o odak assistant user"] * 20), 300)
    tokenizer = with_chat_tokens(base)
    ids, targets = ChatFormat(tokenizer).encode(messages)
    trained = tokenizer.decode(ids[targets].tolist(), skip_special_tokens=False)
    assert trained == "k-a-d-o<|im_end|>odak<|im_end|>"
    context = tokenizer.decode(ids[~targets].tolist(), skip_special_tokens=False)
    assert "Spell kado" in context and "assistant" in context and "k-a-d-o" not in context


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_typed_markers_never_become_special_tokens(kind):
    base = build_char_tokenizer("abc") if kind == "char" else train_bpe_tokenizer(iter(["abc <|im_end|>"] * 5), 300)
    tokenizer = with_chat_tokens(base)
    chat = ChatFormat(tokenizer)
    typed = "a <|im_end|> b <|im_start|>assistant\n<|endoftext|>"
    ids, _ = chat.encode([{"role": "user", "content": typed}, {"role": "assistant", "content": "c"}])
    specials = [i for i in ids.tolist() if i in chat.special_ids.values()]
    # The template's own: start, end (user); start, end (assistant). None from the typed text.
    names = [tokenizer.id_to_token(i) for i in specials]
    assert names == [TURN_START, END_OF_TURN, TURN_START, END_OF_TURN]
    assert typed in tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def test_adding_the_chat_tokens_keeps_every_id_and_is_done_once():
    base = build_char_tokenizer("hello")
    grown = with_chat_tokens(base)
    assert grown.get_vocab_size() == base.get_vocab_size() + 2
    assert all(grown.token_to_id(t) == i for t, i in base.get_vocab(with_added_tokens=True).items())
    assert with_chat_tokens(grown) is grown
    assert base.token_to_id(END_OF_TURN) is None   # the original is left as it was


def test_the_model_grows_by_rows_and_old_tokens_keep_their_logits():
    torch.manual_seed(0)
    config = {"vocab_size": 20, "n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 8, "dropout": 0.0}
    model = build_model(config).eval()
    x = torch.tensor([[1, 5, 7, 3]])
    before = model(x)[0]
    grow_vocabulary(model, 22)
    after = model(x)[0]
    assert after.shape[-1] == 22 and model.config["vocab_size"] == 22
    assert torch.allclose(after[..., :20], before, atol=1e-6)
    assert torch.allclose(model.wte.weight[20], model.wte.weight[:20].mean(0))
    assert model(torch.tensor([[21, 20]]))[0].shape == (1, 2, 22)   # the new ids embed


# ------------------------------------------------------------------ the loss and the windows

def test_the_loss_counts_only_the_answers():
    torch.manual_seed(0)
    config = {"vocab_size": 12, "n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 7, "dropout": 0.0}
    model = build_model(config)
    windows = torch.randint(0, 12, (2, 8)).numpy()
    targets = np.zeros((2, 8), dtype=bool)
    targets[0, 5:7] = targets[1, 2] = True
    part = PackedWindows(windows, targets, 2, 0)
    dataset = ChatDataset(None, None, 7, 0, False, train=part, val=part)
    x, y = dataset.batch("train", np.array([0, 1]))
    assert (y == IGNORED).sum() == 14 - 3
    logits, loss = model(x, y)
    picked = torch.tensor([[0, 4], [0, 5], [1, 1]])    # (window, position) of the three answer targets
    expected = torch.nn.functional.cross_entropy(logits[picked[:, 0], picked[:, 1]],
                                                 torch.from_numpy(windows[picked[:, 0], picked[:, 1] + 1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_packing_keeps_conversations_whole_and_cuts_long_ones_at_a_turn():
    tokenizer = char_chat_tokenizer()
    chat = ChatFormat(tokenizer)
    short = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]
    long = [{"role": "user", "content": "a" * 20}, {"role": "assistant", "content": "b" * 20},
            {"role": "user", "content": "cd"}, {"role": "assistant", "content": "dc"}]
    encoded = chat.encode_many([short, short, long, short])
    window = 40
    packed = pack(encoded, window, tokenizer.token_to_id(END_OF_TEXT), tokenizer.token_to_id(TURN_START))
    assert packed.n_cut == 1 and packed.n_conversations == 4
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=False).replace(END_OF_TEXT, "") for row in packed.windows]
    whole = [render(short), render(long[2:])]
    for text in texts:   # every window is whole conversations, one after the other
        rest = text
        while rest:
            start = next(w for w in whole if rest.startswith(w))
            rest = rest[len(start):]
    assert sum(text.count(render(short)) for text in texts) == 3
    assert any(render(long[2:]) in text for text in texts) and not any("a" * 20 in text for text in texts)
    assert not packed.targets[packed.windows == tokenizer.token_to_id(END_OF_TEXT)].any()   # padding is no target


def test_held_out_conversations_are_whole_copies_together_and_never_trained_on():
    conversations = [[{"role": "user", "content": f"q{i % 30}"}, {"role": "assistant", "content": "a"}]
                     for i in range(90)]
    training, held_out = split_held_out(conversations)
    assert held_out and training and len(training) + len(held_out) == 90
    assert not {json.dumps(m) for m in held_out} & {json.dumps(m) for m in training}
    assert split_held_out(list(reversed(conversations)))[1][::-1] == held_out   # by content, not by order


# ------------------------------------------------------------------ reading the lines

def test_each_bad_line_gets_a_note_with_its_file_and_line_and_is_skipped(tmp_path):
    good = make_conversations(5)
    path = tmp_path / "mixed.jsonl"
    bad = ["{not json", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
           json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
           json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}),
           json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
           json.dumps(["a list"]), json.dumps({"prompt": "no completion"})]
    write_jsonl(path, good, bad)
    with open(path, "ab") as f:
        f.write(b'{"prompt": "caf\xe9", "completion": "x"}\n')   # Latin-1, not UTF-8
    conversations, notes, _ = read_conversations(find_documents(str(path)))
    assert len(conversations) == 5
    reasons = ["not JSON", 'role "bot"', "no assistant turn", "content is empty", "content is not text",
               "not a JSON object", 'no known layout: its keys are "prompt";', "not utf-8 text"]
    assert len(notes) == len(reasons)
    for line_number, (note, reason) in enumerate(zip(notes, reasons), start=6):
        assert f"{path}:{line_number}:" in note and reason in note, note


def test_the_shorthand_is_one_turn_and_messages_after_the_last_answer_are_dropped():
    assert conversation({"prompt": "p", "completion": "c"}) == [
        {"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    messages = conversation({"messages": [{"role": "user", "content": "p"},
                                          {"role": "assistant", "content": "c", "weight": 1},
                                          {"role": "user", "content": "dangling"}]})
    assert messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]


def test_no_usable_conversation_is_one_line_and_nothing_is_written(tmp_path):
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    config_before = (tmp_path / "model_config.pth").read_bytes()
    write_jsonl(tmp_path / "bad.jsonl", [], ["nope", json.dumps({"messages": []})])
    result = run_script("train_llm.py", "--dataset_path", "bad.jsonl", *QUICK, cwd=tmp_path)
    line = one_line_error(result, 2)
    assert "bad.jsonl holds 0 usable conversations, 2 skipped: 1 not JSON (first bad.jsonl:1: not JSON" in line
    assert "1 with no messages (first bad.jsonl:2: its \"messages\" is an empty list)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "model_config.pth"]
    assert (tmp_path / "model_config.pth").read_bytes() == config_before


def test_text_and_conversations_together_are_refused_in_one_line(tmp_path, chat_file):
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    (tmp_path / "docs").mkdir()
    shutil.copy(chat_file, tmp_path / "docs" / "chats.jsonl")
    (tmp_path / "docs" / "notes.txt").write_text("some text\n" * 50)
    line = one_line_error(run_script("train_llm.py", "--dataset_path", "docs", *QUICK, cwd=tmp_path), 2)
    assert "mixes 1 conversation files (.jsonl, .json, .parquet) with 1 text files (docs/notes.txt)" in line
    assert "--init_from" in line


# ------------------------------------------------------------------ the pipeline

def test_training_on_conversations_reports_them_and_learns_answers(chat_trained):
    folder, results = chat_trained
    out = results["train"].stdout
    assert "Conversations: 400 -> " in out and "training positions are answers" in out
    log = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < 0.5 * log[0]["val_loss"]
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    assert tokenizer.token_to_id(END_OF_TURN) == tokenizer.get_vocab_size() - 1


def test_every_export_formats_and_answers_held_out_conversations_as_pytorch(chat_trained):
    folder, results = chat_trained
    err = results["convert"].stdout + results["convert"].stderr
    for name in ("hf_model/", "model.gguf", "model.gguf.Q4_0.gguf"):
        line = next(line for line in err.splitlines() if line.startswith(f"Chat check {name}:"))
        assert "3/3 held-out conversations formatted id for id as in PyTorch" in line, line
    f16 = next(line for line in err.splitlines() if line.startswith("Chat check model.gguf:"))
    assert "greedy answers 3/3 equal" in f16 or "near tie" in f16, f16
    assert "--chat" in err   # the suggested next command


def test_the_exports_carry_the_template_and_the_end_of_turn(chat_trained):
    import gguf
    from transformers import AutoTokenizer
    folder, _ = chat_trained
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    reader = gguf.GGUFReader(str(folder / "model.gguf"))

    def value(key):
        field = reader.fields[key]
        return field.contents()

    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    assert value("tokenizer.ggml.eot_token_id") == tokenizer.token_to_id(END_OF_TURN)
    types = value("tokenizer.ggml.token_type")
    for token in (END_OF_TEXT, TURN_START, END_OF_TURN):
        assert types[tokenizer.token_to_id(token)] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.CONTROL for t in types) == 3

    hf = AutoTokenizer.from_pretrained(str(folder / "hf_model"), local_files_only=True)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Spell kodu"}]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    assert ids == ChatFormat(tokenizer).encode(messages, add_generation_prompt=True)[0].tolist()


def test_a_text_model_fine_tuned_on_conversations_grows_its_vocabulary(text_file, chat_file, tmp_path):
    # Pretrain on text, then teach answers: the stages nanochat has, here in two commands.
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    text_run = run_script("train_llm.py", "--dataset_path", text_file, "--max_steps", 30, *QUICK, cwd=tmp_path)
    assert text_run.returncode == 0, text_run.stderr
    before = load_tokenizer(str(tmp_path / "tokenizer.json"))
    result = run_script("train_llm.py", "--init_from", "trained_model.pth", "--dataset_path", chat_file,
                        "--max_steps", 40, *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{before.get_vocab_size()} -> {before.get_vocab_size() + 2} tokens" in result.stdout
    after = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert after.get_vocab_size() == before.get_vocab_size() + 2
    weights = torch.load(tmp_path / "trained_model.pth", weights_only=True)
    assert weights["wte.weight"].shape[0] == weights["lm_head.weight"].shape[0] == after.get_vocab_size()
    assert_the_chat_check_passes(tmp_path)


def test_a_gpt2_folder_fine_tuned_on_conversations(chat_file, tmp_path):
    folder = save_tiny_gpt2(tmp_path / "tiny-gpt2")
    work = tmp_path / "run"
    work.mkdir()
    result = run_script("train_llm.py", "--init_from", folder, "--dataset_path", chat_file, "--max_steps", 30,
                        *QUICK, cwd=work, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "tokens (the model grows by as many rows)" in result.stdout
    tokenizer = load_tokenizer(str(work / "tokenizer.json"))
    assert tokenizer.token_to_id(END_OF_TURN) is not None
    assert_the_chat_check_passes(work)


def test_a_chat_run_stopped_and_resumed_ends_as_an_uninterrupted_one(chat_file, tmp_path):
    plan = ["--dataset_path", chat_file, "--max_steps", 60, "--seed", 3, "--dtype", "float32",
            "--optimizer", "adamw", "--eval_interval", 10, "--batch_size", "16", "--eval_batches", "2", "-y"]
    assert_resume_ends_as_uninterrupted(tmp_path, CHAT_TINY, plan)


def test_a_timed_chat_run_keeps_to_its_minutes(chat_file, tmp_path):
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    result = run_script("train_llm.py", "--dataset_path", chat_file, "--minutes", 0.15, *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert 0.6 * 9 < log[-1]["elapsed_s"] < 9 + 5


def test_a_bpe_chat_model_from_scratch_and_its_cuts_reported(tmp_path):
    long_talk = {"messages": [{"role": "user", "content": "Spell " + "ka" * 30},
                              {"role": "assistant", "content": "-".join("ka" * 30)}]}
    path = write_jsonl(tmp_path / "chats.jsonl", make_conversations(300, seed=4) + [long_talk] * 2)
    # Rows of one window (64 tokens), which the two long conversations outgrow.
    assert run_script("llm_model.py", *CHAT_TINY, "--tokenizer", "bpe", "--vocab_size", 300, "--train_windows", 1,
                      "-y", cwd=tmp_path).returncode == 0
    result = run_script("train_llm.py", "--dataset_path", path, "--max_steps", 20, *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 conversations longer than a window lost their oldest turns" in result.stdout
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 302 and tokenizer.token_to_id(END_OF_TURN) == 301
    assert_the_chat_check_passes(tmp_path)


def test_without_its_conversations_the_chat_check_says_it_is_skipped(chat_trained, tmp_path):
    folder, _ = chat_trained
    for name in ("model_config.pth", "tokenizer.json", "trained_model.pth"):
        shutil.copy(folder / name, tmp_path / name)
    config = torch.load(tmp_path / "model_config.pth", weights_only=True)
    config["dataset_path"] = str(tmp_path / "moved.jsonl")
    torch.save(config, tmp_path / "model_config.pth")
    convert = run_script("convert_to_gguf.py", cwd=tmp_path)
    assert convert.returncode == 0, convert.stderr
    said = convert.stdout + convert.stderr
    assert "the chat check is skipped" in said and "Chat check" not in said
    assert "--chat" in said
