"""Whole runs through the real scripts on texts that take the unusual paths: <|endoftext|>
separators, one enormous line with no space or newline, the BPE tokenizer, more distinct characters
than 16 bits can number; and the prompt loop where readline does not exist."""

import os
import random
import subprocess
import sys

import numpy as np
from conftest import REPO, TINY, Terminal, assert_same_greedy_text, make_text, one_line_error, prepare, run_script

import custom_llm.textfile as textfile
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import END_OF_TEXT, build_char_tokenizer, encode, load_tokenizer

TRAIN = ["--max_steps", "100", "--batch_size", "16", "--eval_interval", "50", "-y"]


def pipeline(folder, text_path, *model_flags, train=TRAIN):
    """llm_model.py, train_llm.py and convert_to_gguf.py in folder, on the text at text_path."""
    for script, args in [("llm_model.py", [*TINY, *model_flags, "-y"]),
                         ("train_llm.py", ["--dataset_path", text_path, *train]),
                         ("convert_to_gguf.py", [])]:
        result = run_script(script, *args, cwd=folder)
        assert result.returncode == 0, f"{script}: {result.stdout}\n{result.stderr}"
    return result


# ---------------------------------------------------------------- <|endoftext|>

def test_end_of_text_separators_through_the_gguf(tmp_path):
    documents = [make_text(25, seed=seed) for seed in range(40)]
    text_path = tmp_path / "documents.txt"
    text_path.write_text(END_OF_TEXT.join(documents), encoding="utf-8")
    pipeline(tmp_path, text_path)
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer.json"))
    eot = tokenizer.token_to_id(END_OF_TEXT)
    text = text_path.read_text(encoding="utf-8")
    ids = encode(tokenizer, text)
    assert ids.count(eot) == len(documents) - 1
    # The training tokens are the text's, separators included; llama.cpp reads the text the same way.
    assert prepare(str(text_path)).tokens.tolist() == ids
    assert GGUFModel(str(tmp_path / "model.gguf")).tokenize(text) == ids
    for prompt in [documents[1][-60:] + END_OF_TEXT, "Seven apples." + END_OF_TEXT + "The", END_OF_TEXT]:
        assert_same_greedy_text(tmp_path, prompt, 100)


# ------------------------------------------------------------ an enormous line

LAUNCH = """
import atexit, runpy, sys
sys.path.insert(0, {repo!r})
import custom_llm.textfile as textfile
textfile.CHUNK_BYTES = {chunk}   # small chunks: a line without space or newline outgrows 16 of them
cut = textfile._cut_between_characters
cuts = []
textfile._cut_between_characters = lambda data: cuts.append(1) or cut(data)
atexit.register(lambda: print(f"cuts between characters: {{len(cuts)}}", file=sys.stderr))
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def run_with_small_chunks(script, *args, cwd, chunk=64):
    code = LAUNCH.format(repo=str(REPO), chunk=chunk, script=str(REPO / script))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)


def test_one_enormous_line_without_spaces_is_cut_between_characters(tmp_path, monkeypatch):
    rng = random.Random(0)
    pieces = ["ünïcode", "日本語", "🙂", "abcdefgh", "Zürich", END_OF_TEXT, "👨‍👩‍👧", "ok!"]
    text = "".join(rng.choice(pieces) for _ in range(6000))   # no space, no newline: no safe cut anywhere
    assert " " not in text and "\n" not in text
    path = tmp_path / "line.txt"
    path.write_text(text, encoding="utf-8")
    # In this process: the reader takes the no-cut path, and the tokens are the whole text's.
    monkeypatch.setattr(textfile, "CHUNK_BYTES", 64)
    cuts = []
    real_cut = textfile._cut_between_characters
    monkeypatch.setattr(textfile, "_cut_between_characters", lambda b: cuts.append(1) or real_cut(b))
    dataset = prepare(str(path))
    assert len(cuts) > 20
    assert dataset.tokens.tolist() == encode(dataset.tokenizer, text)
    monkeypatch.undo()
    # Through the scripts, reading in the same small chunks: training, then the GGUF.
    work = tmp_path / "work"
    work.mkdir()
    assert run_script("llm_model.py", *TINY, "-y", cwd=work).returncode == 0
    (path.parent / ".token_cache").rename(path.parent / ".token_cache.before")   # prepared again, by the script
    trained = run_with_small_chunks("train_llm.py", "--dataset_path", path, *TRAIN, cwd=work)
    assert trained.returncode == 0, trained.stderr
    assert int(trained.stderr.rsplit("cuts between characters: ", 1)[1]) > 20
    assert run_script("convert_to_gguf.py", "--quant_type", "F32", cwd=work).returncode == 0
    tokenizer = load_tokenizer(str(work / "tokenizer.json"))
    ids = encode(tokenizer, text)
    assert prepare(str(path)).tokens.tolist() == ids    # what training read
    assert GGUFModel(str(work / "model.gguf")).tokenize(text) == ids
    # Greedy text is compared on the F32 file: F16's rounding can flip a near-tie between two
    # tokens (it did at token 30 of 100 here, on an Intel Xeon with AMX: 99.2% next-token agreement).
    assert_same_greedy_text(work, text[:40], 100, gguf="model.gguf.F32.gguf")


# --------------------------------------------------------------------------- BPE

def test_the_bpe_tokenizer_through_gguf_inference(tmp_path, text_file):
    pipeline(tmp_path, text_file, "--tokenizer", "bpe", "--vocab_size", "400")
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() > 300 and len(encode(tokenizer, "The miller mends the boats")) < 20
    generated = assert_same_greedy_text(tmp_path, "The miller mends", 3 * 32)   # past the context
    assert len(generated) == 3 * 32 or generated[-1] == tokenizer.token_to_id(END_OF_TEXT)


# ------------------------------------------------------ more characters than uint16

def many_characters(n):
    """n distinct characters: CJK ideographs (and their extensions), Hangul syllables."""
    ranges = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xAC00, 0xD7A3), (0x20000, 0x2A6DF)]
    characters = [chr(c) for low, high in ranges for c in range(low, high + 1)][:n]
    assert len(characters) == n
    return characters


def test_more_distinct_characters_than_16_bits_number(tmp_path):
    characters = many_characters(66_000)
    lines = ["".join(characters[i:i + 60]) for i in range(0, len(characters), 60)]
    path = tmp_path / "many.txt"
    path.write_text("\n".join(lines * 2) + "\n", encoding="utf-8")
    # The character tokenizer: a clear error, before anything is written.
    work = tmp_path / "char"
    work.mkdir()
    assert run_script("llm_model.py", *TINY, "-y", cwd=work).returncode == 0
    line = one_line_error(run_script("train_llm.py", "--dataset_path", path, *TRAIN, cwd=work))
    assert "more than 65,277 distinct characters" in line and "--tokenizer bpe" in line
    assert sorted(os.listdir(work)) == ["model_config.pth"]
    # A BPE tokenizer reads the same text, through to the GGUF.
    work = tmp_path / "bpe"
    work.mkdir()
    pipeline(work, path, "--tokenizer", "bpe", "--vocab_size", "1000",
             train=["--max_steps", "5", "--batch_size", "8", "-y"])
    tokenizer = load_tokenizer(str(work / "tokenizer.json"))
    sample = "".join(lines[100:103])
    assert GGUFModel(str(work / "model.gguf")).tokenize(sample) == encode(tokenizer, sample)


def test_token_files_of_a_vocabulary_beyond_16_bits(tmp_path):
    """A tokenizer with more than 65,533 ids (a large BPE, --init_from) gets a 32-bit token file."""
    characters = many_characters(70_000)
    tokenizer = build_char_tokenizer(characters)
    text = "".join(characters[-3000:]) + END_OF_TEXT + "".join(characters[:50]) + "\nand some ASCII 🙂\n"
    path = tmp_path / "t.txt"
    path.write_text(text * 3, encoding="utf-8")
    for attempt in range(2):
        dataset = prepare(str(path), tokenizer=tokenizer)
        assert dataset.from_cache == bool(attempt)
        assert dataset.tokens.dtype == np.uint32 and int(dataset.tokens.max()) > 65_535
        assert dataset.tokens.tolist() == encode(tokenizer, text * 3)


# ------------------------------------------------------------------ no readline

def test_the_prompt_loop_works_without_readline(trained, tmp_path, monkeypatch):
    folder, _ = trained
    (tmp_path / "readline.py").write_text("raise ImportError('no readline here, as on Windows')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    term = Terminal("inference_gguf.py", "--max_tokens", 10, cwd=folder)
    term.read_until("> ")
    term.send("Hello there\n")
    term.read_until("tokens/s")
    term.read_until("> ")
    term.send("\x04")
    assert term.wait() == 0
    assert "Hello there" in term.output and "Traceback" not in term.output
