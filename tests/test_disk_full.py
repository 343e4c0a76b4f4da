"""A full disk, for real, under every writer: the one-line error naming the file and the reason,
the previous file whole, no temporary left. Two real small file systems: the file size limit
(RLIMIT_FSIZE, in the child process only; it needs no privileges) and, where this machine lets
root mount one, a tmpfs of a few MB filled up to the last bytes."""

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, TINY

from custom_llm.export import write_gguf_atomic
from custom_llm.files import load_config, load_trained_model
from custom_llm.tokenizer import load_tokenizer

PREVIOUS = ["model_config.pth", "tokenizer.json", "trained_model.pth", "checkpoint.pth", "hf_model", "model.gguf",
            "model.gguf.Q4_0.gguf"]

# A few lines of Python running one writer the way convert_to_gguf.py does, under cli.run.
WRITE = """
import sys
sys.path.insert(0, {repo!r})
from custom_llm.cli import run
from custom_llm.export import quantize_atomic, write_gguf_atomic
from custom_llm.files import load_config, load_trained_model
from custom_llm.tokenizer import load_tokenizer

def main():
    model = load_trained_model("trained_model.pth", load_config("model_config.pth"))
    tokenizer = load_tokenizer("tokenizer.json")
    {action}

run(main)
"""


def training(text_file):
    return [str(REPO / "train_llm.py"), "--dataset_path", str(text_file), "--max_steps", "2", "--eval_interval", "1",
            "--checkpoint_interval", "1", "--batch_size", "8", "-y"]


# writer: (the file it writes, bytes the small disk leaves for it, the command that writes it)
WRITERS = {
    "config": ("model_config.pth", 1_000, lambda text, f32: [str(REPO / "llm_model.py"), *TINY, "-y"]),
    "tokenizer": ("tokenizer.json", 4_000, lambda text, f32: training(text)),
    "weights": ("trained_model.pth", 300_000, lambda text, f32: training(text)),
    "checkpoint": ("checkpoint.pth", 800_000, lambda text, f32: training(text)),
    "hf_model": ("hf_model", 100_000, lambda text, f32: [str(REPO / "convert_to_gguf.py")]),
    "gguf": ("model.gguf", 100_000, lambda text, f32: [
        "-c", WRITE.format(repo=str(REPO), action='write_gguf_atomic(model, tokenizer, "model.gguf", "F16")')]),
    "quantized": ("model.gguf.Q4_0.gguf", 50_000, lambda text, f32: [
        "-c", WRITE.format(repo=str(REPO), action=f'quantize_atomic({str(f32)!r}, "model.gguf.Q4_0.gguf", "Q4_0")')]),
}


def contents(path) -> dict:
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))}
    return {"": path.read_bytes()}


@pytest.fixture(scope="module")
def f32_source(trained, tmp_path_factory):
    folder, _ = trained
    path = tmp_path_factory.mktemp("source") / "source.gguf"
    write_gguf_atomic(load_trained_model(str(folder / "trained_model.pth"), load_config(str(folder / "model_config.pth"))),
               load_tokenizer(str(folder / "tokenizer.json")), str(path), "F32")
    return path


@pytest.fixture
def small_tmpfs(tmp_path):
    """A folder on a tmpfs of 16 MB (root, where mounting is allowed), unmounted afterwards: room for the
    previous exports, whose GGUFs carry a 4096-row position table (docs/context.md)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and the right to mount)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def set_up(trained, folder):
    source, _ = trained
    for name in PREVIOUS:
        (shutil.copytree if (source / name).is_dir() else shutil.copy2)(source / name, folder / name)


def check(result, folder, target, before, reason):
    """The one-line error, the previous file whole, no temporary left."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == f"error: cannot write {folder / target}: {reason}; the previous file is untouched", lines[-1]
    # Training prints its validation lines on stderr before the checkpoint: nothing else there.
    assert all(line.startswith("step ") for line in lines[:-1]), result.stderr
    assert contents(folder / target) == before
    assert [name for name in os.listdir(folder) if name.startswith(".")] == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_file_size_limit_under_every_writer(trained, text_file, f32_source, tmp_path, writer):
    target, room, command = WRITERS[writer]
    set_up(trained, tmp_path)
    before = contents(tmp_path / target)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # so that the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run([sys.executable, *command(text_file, f32_source)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    check(result, tmp_path, target, before,
          f"File too large (this process may write files of at most {room:,} bytes: ulimit -f)")


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_under_every_writer(trained, text_file, f32_source, small_tmpfs, writer):
    target, room, command = WRITERS[writer]
    set_up(trained, small_tmpfs)
    before = contents(small_tmpfs / target)
    free = shutil.disk_usage(small_tmpfs).free
    with open(small_tmpfs / "filler", "wb") as f:   # leave about `room` bytes
        f.truncate(0)
        f.write(b"\0" * (free - room))
    result = subprocess.run([sys.executable, *command(text_file, f32_source)], cwd=small_tmpfs,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    check(result, small_tmpfs, target, before, "No space left on device")


def test_a_bug_while_writing_is_not_called_a_failed_write(tmp_path):
    """Only failed writes become 'cannot write': a bug in the code writing the file shows as itself."""
    from custom_llm.atomic import atomic_path
    target = tmp_path / "trained_model.pth"
    target.write_bytes(b"previous")
    with pytest.raises(OverflowError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OverflowError("Python integer 65536 out of bounds for uint16")
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["trained_model.pth"]
