"""Only real files, each read once: named pipes, devices and sockets among the documents are
skipped with a note, unopened (a pipe would block the reader forever); a file reached by several
paths, links or globs is read once; symlinked folders are followed, each real folder once, so a
link loop ends. What could hang runs in a subprocess with a timeout."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, TINY, make_text, one_line_error, prepare, run_script

from custom_llm.corpus import find_documents

FIND = """
import json, sys
sys.path.insert(0, {repo!r})
from conftest import prepare
spec = json.loads(sys.argv[1])
dataset = prepare(spec)
corpus = dataset.corpus
print(json.dumps({{"documents": [d.path for d in corpus.documents], "notes": corpus.notes(),
                  "describe": corpus.describe(), "n_tokens": len(dataset.tokens)}}))
"""


def found(spec, cwd, timeout=120):
    """What training would read for spec, prepared in a subprocess that may not hang."""
    code = FIND.format(repo=str(REPO / "tests"))
    try:
        result = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=cwd, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"finding the documents of {spec} did not end in {timeout} s")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def documents(folder):
    """Two documents in folder/real, and folder/link, a symlink to that folder."""
    write(folder / "real" / "a.txt", make_text(20, seed=1))
    write(folder / "real" / "b.md", make_text(20, seed=2))
    os.symlink("real", folder / "link")


# ------------------------------------------------------------------ not regular files

def test_a_named_pipe_among_the_documents_is_skipped_unopened(tmp_path):
    documents(tmp_path / "docs")
    os.mkfifo(tmp_path / "docs" / "pipe.txt")    # opened for reading, it would wait for a writer forever
    result = found("docs", tmp_path)
    assert result["documents"] == ["docs/real/a.txt", "docs/real/b.md"]
    assert result["notes"] == ["note: skipped docs/pipe.txt, which is not a regular file (a named pipe)"]
    assert result["describe"] == "2 files (1 skipped), "


def test_a_socket_among_the_documents_is_skipped(tmp_path):
    documents(tmp_path / "docs")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "docs" / "real" / "socket.md"))
        result = found(["docs/real"], tmp_path)
    finally:
        server.close()
    assert result["documents"] == ["docs/real/a.txt", "docs/real/b.md"]
    assert result["notes"] == ["note: skipped docs/real/socket.md, which is not a regular file (a socket)"]


def test_a_device_named_explicitly_is_skipped(tmp_path):
    documents(tmp_path / "docs")
    result = found(["docs/real/a.txt", "/dev/null", "docs/real/b.md"], tmp_path)
    assert result["documents"] == ["docs/real/a.txt", "docs/real/b.md"]
    assert result["notes"] == ["note: skipped /dev/null, which is not a regular file (a device)"]


def test_one_named_pipe_or_device_given_alone_is_a_one_line_error(tmp_path):
    assert run_script("llm_model.py", *TINY, "-y", cwd=tmp_path).returncode == 0
    os.mkfifo(tmp_path / "pipe.txt")
    for path, kind in [("pipe.txt", "a named pipe"), ("/dev/null", "a device")]:
        try:
            result = run_script("train_llm.py", "--dataset_path", path, "-y", cwd=tmp_path, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train_llm.py --dataset_path {path} did not end")
        line = one_line_error(result, 2)
        assert f"{path} is not a regular file ({kind}): give the path of a text file" in line, line


# --------------------------------------------------------------------- each file once

def test_a_recursive_glob_through_a_symlinked_folder_reads_each_file_once(tmp_path):
    documents(tmp_path / "docs")
    os.symlink("..", tmp_path / "docs" / "real" / "up")    # and a loop back up
    for spec in ["docs/**", "docs/**/*.txt"]:
        result = found(spec, tmp_path)
        expected = ["docs/real/a.txt"] + ([] if spec.endswith(".txt") else ["docs/real/b.md"])
        assert result["documents"] == expected, spec   # by their real path: no link on the way
        assert result["describe"] == f"{len(expected)} file{'s' if len(expected) > 1 else ''}, "
    # Where a glob names the link itself, its path is the one given.
    assert [os.path.basename(p) for p in found("docs/*/**", tmp_path)["documents"]] == ["a.txt", "b.md"]


def test_a_symlink_loop_ends(tmp_path):
    loop = tmp_path / "loop"
    write(loop / "inner" / "c.txt", make_text(20, seed=3))
    os.symlink("../../loop", loop / "inner" / "again")    # loop/inner/again -> loop
    os.symlink("..", loop / "inner" / "up")               # loop/inner/up -> loop
    for spec in ["loop", "loop/**", "loop/**/*.txt", ["loop", "loop/inner/again/inner/c.txt"]]:
        result = found(spec, tmp_path)
        assert result["documents"] == ["loop/inner/c.txt"], spec
        assert result["notes"] == []


def test_a_broken_link_among_the_documents_is_skipped(tmp_path):
    documents(tmp_path / "docs")
    os.symlink("gone.txt", tmp_path / "docs" / "real" / "dangling.txt")   # names no file
    os.symlink("y.md", tmp_path / "docs" / "real" / "x.md")               # x -> y -> x: round a loop
    os.symlink("x.md", tmp_path / "docs" / "real" / "y.md")
    result = found("docs", tmp_path)
    assert result["documents"] == ["docs/real/a.txt", "docs/real/b.md"]
    assert result["notes"] == [f"note: skipped docs/real/{name}, which is a broken link (it leads to no file)"
                               for name in ["dangling.txt", "x.md", "y.md"]]


def test_a_symlinked_folder_inside_a_folder_is_read_once(tmp_path):
    documents(tmp_path / "docs")
    write(tmp_path / "elsewhere" / "e.txt", make_text(20, seed=4))
    os.symlink("../elsewhere", tmp_path / "docs" / "more")   # a folder outside, linked in: read
    corpus = find_documents(str(tmp_path / "docs"))
    assert [d.path for d in corpus.documents] == [str(tmp_path / "docs" / p)
                                                   for p in ["more/e.txt", "real/a.txt", "real/b.md"]]


def test_the_same_file_by_several_paths_is_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    documents(tmp_path / "docs")
    os.symlink("real/a.txt", tmp_path / "docs" / "alias.txt")
    os.link(tmp_path / "docs" / "real" / "b.md", tmp_path / "hard.md")    # a hard link: the same file
    spec = ["docs/real/a.txt", "docs/link/a.txt", "./docs/real/a.txt", str(tmp_path / "docs/real/a.txt"),
            "docs/alias.txt", "hard.md", "docs", "docs/**/*.md"]
    corpus = find_documents(spec)
    assert [d.path for d in corpus.documents] == ["docs/real/a.txt", "hard.md"]
    assert corpus.describe() == "2 files, "
    tokens = prepare(spec).tokens
    assert len(tokens) == len(prepare(["docs/real/a.txt", "docs/real/b.md"]).tokens)   # each text once
