"""Training on documents: a folder (recursively), several paths and globs. Documents are joined
with <|endoftext|>, whole documents are held out for validation, files that are not text are
skipped with a note, and the manifest keys the cache and is saved with the run."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY, make_text, one_line_error, prepare, run_script

import custom_llm.text_data as data
from custom_llm.corpus import MIN_HELD_OUT_DOCUMENTS, find_documents, parse_dataset_answer
from custom_llm.tokenizer import END_OF_TEXT, decode, encode
from custom_llm.tokens_cache import bpe_tokenizer_for

QUICK = ["--max_steps", 4, "--batch_size", 8, "--eval_interval", 2, "--eval_batches", 2, "-y"]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def documents(folder, n, sentences=40):
    """n documents of different lengths in nested folders, as {path: text}."""
    texts = {}
    for i in range(n):
        path = folder / f"part{i % 3}" / ("deep" if i % 2 else "") / f"doc{i:02d}.{'md' if i % 4 else 'txt'}"
        texts[path] = write(path, make_text(sentences + 7 * i, seed=i)).read_text(encoding="utf-8")
    return texts


def split_at_end_of_text(ids, tokenizer):
    """The texts between <|endoftext|> tokens."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    pieces, start = [], 0
    for at in np.flatnonzero(np.asarray(ids) == eot).tolist() + [len(ids)]:
        pieces.append(decode(tokenizer, ids[start:at]))
        start = at + 1
    return pieces


# ------------------------------------------------------------------- what is read

def test_a_folder_gives_its_txt_and_md_files_recursively_in_sorted_order(tmp_path):
    notes = tmp_path / "notes"
    for name in ["b.md", "a.txt", "sub/z.TXT", "sub/deeper/c.md", "a/y.txt"]:
        write(notes / name, f"text of {name}\n")
    for name in ["script.py", "image.png", "notes.txt.bak", ".hidden.txt", ".git/HEAD.txt", ".token_cache/x.txt"]:
        write(notes / name, "not a document\n")
    corpus = find_documents(str(notes))
    expected = sorted(str(notes / name) for name in ["b.md", "a.txt", "sub/z.TXT", "sub/deeper/c.md", "a/y.txt"])
    assert [d.path for d in corpus.documents] == expected
    assert [d.path for d in find_documents(str(notes) + "/").documents] == \
        sorted(str(notes) + "/" + name for name in ["b.md", "a.txt", "sub/z.TXT", "sub/deeper/c.md", "a/y.txt"])
    assert not corpus.single and not corpus.skipped


def test_several_paths_and_a_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "notes/b.txt", "b\n")
    write(tmp_path / "notes/a.md", "a\n")
    write(tmp_path / "extra.txt", "extra\n")
    write(tmp_path / "posts/2.md", "two\n")
    write(tmp_path / "posts/1.md", "one\n")
    write(tmp_path / "posts/skip.txt", "not matched\n")
    write(tmp_path / "with space.txt", "spaced\n")
    # The answer to the question (or the flag's words): spaces between paths, quotes where a path has one.
    spec = parse_dataset_answer("notes extra.txt 'posts/*.md' notes/a.md 'with space.txt'")
    assert spec == ["notes", "extra.txt", "posts/*.md", "notes/a.md", "with space.txt"]
    assert [d.path for d in find_documents(spec).documents] == \
        ["notes/a.md", "notes/b.txt", "extra.txt", "posts/1.md", "posts/2.md", "with space.txt"]  # each once
    assert parse_dataset_answer("with space.txt") == "with space.txt"   # one path needs no quotes
    for answer, reason in [("nothing.txt", "nothing.txt does not exist"), ("'posts/*.rst'", "matches no file")]:
        with pytest.raises(ValueError, match=reason):
            parse_dataset_answer(answer)


def test_documents_are_joined_by_end_of_text(tmp_path):
    texts = documents(tmp_path / "few", 3)
    dataset = prepare(str(tmp_path / "few"))
    order = [d.path for d in dataset.corpus.documents]
    assert order == sorted(str(p) for p in texts)
    tokenizer, eot = dataset.tokenizer, dataset.tokenizer.token_to_id(END_OF_TEXT)
    expected = []
    for i, path in enumerate(order):
        expected += ([eot] if i else []) + encode(tokenizer, texts[tmp_path / path])
    assert dataset.tokens.tolist() == expected
    assert dataset.n_characters == sum(len(t) for t in texts.values())
    # Fewer documents than MIN_HELD_OUT_DOCUMENTS: the last 10% of the tokens, as for one file.
    assert len(texts) < MIN_HELD_OUT_DOCUMENTS and dataset.n_val == int(len(expected) * data.VALIDATION_FRACTION)


def test_validation_is_whole_documents_chosen_by_content(tmp_path):
    texts = documents(tmp_path / "many", 24)
    dataset = prepare(str(tmp_path / "many"))
    tokenizer, eot = dataset.tokenizer, dataset.tokenizer.token_to_id(END_OF_TEXT)
    held_out = [d.path for d in dataset.corpus.held_out]
    training = [d.path for d in dataset.corpus.documents if not d.held_out]
    assert held_out and training and not set(held_out) & set(training)
    assert held_out != sorted(held_out + training)[-len(held_out):]   # not simply the last files by name
    # The two token ranges: the training documents (each ended by <|endoftext|>), then the held-out ones.
    assert int(dataset.train[-1]) == eot and int(dataset.val[0]) != eot
    assert split_at_end_of_text(dataset.train.tolist(), tokenizer) == [texts[tmp_path / p] for p in training] + [""]
    assert split_at_end_of_text(dataset.val.tolist(), tokenizer) == [texts[tmp_path / p] for p in held_out]
    assert 0.05 < len(dataset.val) / len(dataset.tokens) < 0.2
    # The same choice every time, from the cache too.
    again = prepare(str(tmp_path / "many"))
    assert again.from_cache and [d.path for d in again.corpus.held_out] == held_out
    assert again.n_val == dataset.n_val


def test_one_file_keeps_the_last_ten_percent(tmp_path):
    path = write(tmp_path / "one.txt", make_text(300))
    dataset = prepare(str(path))
    assert dataset.corpus.single and dataset.corpus.key == dataset.text_hash
    assert len(dataset.val) == int(len(dataset.tokens) * data.VALIDATION_FRACTION)
    assert dataset.val_source == f"the last 10% of {path}"


# --------------------------------------------------------------------- skipped files

def test_binary_and_wrongly_encoded_files_are_skipped_with_a_note_each(tmp_path):
    folder = tmp_path / "mixed"
    documents(folder, 3)
    (folder / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (folder / "latin1.md").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    (folder / "empty.txt").write_bytes(b"")
    dataset = prepare(str(folder))
    assert len(dataset.corpus.documents) == 3
    assert dataset.notes == [f"note: skipped {folder / 'empty.txt'}, which is empty",
                             f"note: skipped {folder / 'latin1.md'}, which is not valid utf-8 (bad byte at byte "
                             "offset 3)",
                             f"note: skipped {folder / 'photo.txt'}, which is a binary file (it has NUL bytes)"]
    assert all("au lait" not in piece for piece in split_at_end_of_text(dataset.tokens.tolist(), dataset.tokenizer))
    # In latin-1 the same file is text (the binary one still is not).
    latin = prepare(str(folder), encoding="latin-1")
    assert len(latin.corpus.documents) == 4 and [d.path for d in latin.corpus.skipped] == \
        [str(folder / "empty.txt"), str(folder / "photo.txt")]


def test_nothing_readable_is_a_one_line_error(tmp_path):
    assert run_script("llm_model.py", *TINY, "-y", cwd=tmp_path).returncode == 0
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\x00\x01\x02" * 100)
    (folder / "b.txt").write_bytes("\xe9t\xe9\n".encode("latin-1") * 10)
    line = one_line_error(run_script("train_llm.py", "--dataset_path", "bad", *QUICK, cwd=tmp_path))
    assert "nothing readable in bad" in line and "bad/a.txt is a binary file" in line
    assert "bad/b.txt is not valid utf-8" in line
    assert "--encoding" in line
    assert sorted(os.listdir(tmp_path)) == ["bad", "model_config.pth"]


def test_paths_that_name_no_text_are_one_line_errors(tmp_path):
    assert run_script("llm_model.py", *TINY, "-y", cwd=tmp_path).returncode == 0
    (tmp_path / "empty").mkdir()
    write(tmp_path / "only_code" / "x.py", "print()\n")
    write(tmp_path / "real.txt", make_text(300))
    cases = [(["missing/"], "missing/ does not exist"), (["empty"], "empty holds no .txt, .md, .jsonl, .json or .parquet files"),
             (["only_code"], "only_code holds no .txt, .md, .jsonl, .json or .parquet files"),
             (["real.txt", "posts/*.md"], "posts/*.md matches no file")]
    for paths, reason in cases:
        line = one_line_error(run_script("train_llm.py", "--dataset_path", *paths, *QUICK, cwd=tmp_path), 2)
        assert reason in line, line
    assert sorted(os.listdir(tmp_path)) == ["empty", "model_config.pth", "only_code", "real.txt"]


# ---------------------------------------------------------------------------- cache

def test_the_cache_is_keyed_by_the_manifest(tmp_path):
    folder = tmp_path / "docs"
    texts = documents(folder, 12)
    first = prepare(str(folder))
    assert not first.from_cache and prepare(str(folder)).from_cache
    path = sorted(texts)[5]
    changes = [lambda: path.write_text(texts[path] + "one more line\n", encoding="utf-8"),   # changed
               lambda: write(folder / "new" / "added.md", make_text(30, seed=99)),          # added
               lambda: sorted(texts)[0].unlink()]                                          # removed
    keys = {first.text_hash}
    for change in changes:
        change()
        dataset = prepare(str(folder))
        assert not dataset.from_cache and dataset.text_hash not in keys
        keys.add(dataset.text_hash)
        assert prepare(str(folder)).from_cache


def test_the_bpe_tokenizer_is_trained_on_every_document(tmp_path):
    folder = tmp_path / "docs"
    documents(folder, 4)
    write(folder / "zz" / "rare.md", "zyxwvutsrq qponmlkjih\n" * 200)
    tokenizer, from_cache = bpe_tokenizer_for(find_documents(str(folder)), 400)
    assert not from_cache and len(encode(tokenizer, "zyxwvutsrq")) <= 2   # learned from one file only
    assert bpe_tokenizer_for(find_documents(str(folder)), 400)[1]
    dataset = prepare(str(folder), tokenizer=tokenizer)
    assert dataset.tokens.tolist().count(tokenizer.token_to_id(END_OF_TEXT)) == 4


# ---------------------------------------------------------------- through the scripts

def test_train_on_a_folder_then_export(tmp_path):
    work, folder = tmp_path / "work", tmp_path / "work" / "notes"
    texts = documents(folder, 12)
    (folder / "image.txt").write_bytes(b"GIF89a\x00\x00" + bytes(100))
    assert run_script("llm_model.py", *TINY, "-y", cwd=work).returncode == 0
    first = run_script("train_llm.py", "--dataset_path", "notes", *QUICK, cwd=work)
    assert first.returncode == 0, first.stderr
    assert "Text: 12 files (1 skipped), " in first.stdout and "whole files held out" in first.stdout
    assert first.stdout.count("note: skipped") == 1 and "note: skipped notes/image.txt" in first.stdout
    manifest = json.loads((work / "dataset_manifest.json").read_text())
    assert manifest["dataset_path"] == "notes" and len(manifest["files"]) == 13
    assert [f["path"] for f in manifest["files"] if f.get("skipped")] == ["notes/image.txt"]
    held_out = [f["path"] for f in manifest["files"] if f.get("held_out")]
    assert held_out
    # The question's answer, paths separated by spaces: the same documents, from the token cache.
    again = run_script("train_llm.py", "--max_steps", 4, "--eval_interval", 2, cwd=work, input="8\n\n\nnotes\n")
    assert again.returncode == 0, again.stderr
    assert "(from the token cache)" in again.stdout
    # The export's checks run on the held-out files.
    converted = run_script("convert_to_gguf.py", "--quant_type", "Q8_0,Q4_0", "--eval_tokens", 500, cwd=work)
    assert converted.returncode == 0, converted.stderr
    assert f"tokens of the {len(held_out)} held-out files of {folder}" in converted.stdout
    # A file changed since the checkpoint: --resume names it.
    path = work / held_out[0]
    path.write_text(texts[path] + "changed\n", encoding="utf-8")
    line = one_line_error(run_script("train_llm.py", "--resume", cwd=work))
    assert f"changed since the checkpoint ({held_out[0]} changed)" in line
    assert torch.load(work / "checkpoint.pth", weights_only=True)["manifest"]["key"] == manifest["key"]


def test_a_run_moved_with_its_documents_resumes_and_a_changed_file_is_named(tmp_path):
    first_place, second_place = tmp_path / "A", tmp_path / "B"
    texts = documents(first_place / "notes", 12)
    assert run_script("llm_model.py", *TINY, "-y", cwd=first_place).returncode == 0
    first = run_script("train_llm.py", "--dataset_path", "notes", *QUICK, cwd=first_place)
    assert first.returncode == 0, first.stderr
    os.rename(first_place, second_place)   # the run's folder and its documents, moved together
    (second_place / "dataset_manifest.json").unlink()   # derived from the documents: written again
    resumed = run_script("train_llm.py", "--resume", cwd=second_place)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from checkpoint.pth at step 4" in resumed.stdout
    assert "(from the token cache)" in resumed.stdout   # the cache's key moved with the documents too
    checkpoint = torch.load(second_place / "checkpoint.pth", weights_only=True)
    assert json.loads((second_place / "dataset_manifest.json").read_text())["key"] == checkpoint["text_hash"]
    # A checkpoint whose key was made another way (before, from absolute paths): the content decides.
    torch.save({**checkpoint, "text_hash": "0" * 32}, second_place / "checkpoint.pth")
    again = run_script("train_llm.py", "--resume", cwd=second_place)
    assert again.returncode == 0, again.stderr
    # A changed, added or removed document is still named.
    path = second_place / sorted(texts)[3].relative_to(first_place)
    name = str(path.relative_to(second_place))
    path.write_text(texts[sorted(texts)[3]] + "one more line\n", encoding="utf-8")
    assert f"changed since the checkpoint ({name} changed)" in \
        one_line_error(run_script("train_llm.py", "--resume", cwd=second_place))
    path.write_text(texts[sorted(texts)[3]], encoding="utf-8")
    write(second_place / "notes" / "new.md", make_text(30, seed=99))
    assert "changed since the checkpoint (notes/new.md added)" in \
        one_line_error(run_script("train_llm.py", "--resume", cwd=second_place))
    (second_place / "notes" / "new.md").unlink()
    path.unlink()
    assert f"changed since the checkpoint ({name} removed)" in \
        one_line_error(run_script("train_llm.py", "--resume", cwd=second_place))
