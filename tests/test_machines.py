"""Several machines without a shared disk: two torchrun nodes on 127.0.0.1, each in a folder of
its own. Rank 0's folder holds the run's files; the other node needs only the text."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY, run_script

PLAN = ["--batch_size", "8", "--learning_rate", "0.003", "--eval_interval", "5", "--max_steps", "40", "-y",
        "--dtype", "float32", "--optimizer", "adamw", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(folders, *args):
    """One torchrun node per folder (node_rank = its index), one process each, as on two machines.
    Each is its own process group, as a terminal of its own would make it. What each training
    process prints goes to its folder's logs/ (torchrun's own report of a failure is torchrun's)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = free_port()
    return [subprocess.Popen([torchrun, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                              "--master_addr=127.0.0.1", f"--master_port={port}", "--redirects=3",
                              f"--log-dir={folder / 'logs'}", str(REPO / "train_llm.py"),
                              *map(str, args)], cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
            for rank, folder in enumerate(folders)]


def finish(nodes, folders, timeout=600):
    """Each node's exit status, and what its training process wrote (stdout, stderr) in this run."""
    results = []
    for node, folder in zip(nodes, folders):
        node.communicate(timeout=timeout)
        newest = max((folder / "logs").iterdir(), key=lambda p: p.stat().st_mtime)
        process_logs = next(newest.glob("attempt_*/0"))
        results.append((node.returncode, (process_logs / "stdout.log").read_text(),
                        (process_logs / "stderr.log").read_text()))
        shutil.rmtree(folder / "logs")
    return results


def make_nodes(tmp_path_factory, name, text):
    """Two machines' folders: each has the text; only the first has model_config.pth."""
    folders = [tmp_path_factory.mktemp(f"{name}{rank}") for rank in range(2)]
    for folder in folders:
        shutil.copy(text, folder / "text.txt")
    assert run_script("llm_model.py", *TINY, "-y", cwd=folders[0]).returncode == 0
    return folders


def wait_for_step(log, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and any(f'"step": {s},' in log.read_text() for s in range(step, step + 40)):
            return
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def test_two_machines_without_a_shared_disk_train_stop_and_resume_as_one_run(text_file, tmp_path_factory):
    reference = make_nodes(tmp_path_factory, "reference", text_file)
    results = finish(start_nodes(reference, "--dataset_path", "text.txt", *PLAN), reference)
    assert all(code == 0 for code, _, _ in results), results
    assert set(os.listdir(reference[1])) - {".token_cache"} == {"text.txt"}   # the run's files are rank 0's

    folders = make_nodes(tmp_path_factory, "node", text_file)
    nodes = start_nodes(folders, "--dataset_path", "text.txt", *PLAN)
    wait_for_step(folders[0] / "training_log.jsonl", 10)
    os.killpg(nodes[1].pid, signal.SIGINT)     # Ctrl-C at the second machine's terminal
    stopped = finish(nodes, folders)
    assert [code for code, _, _ in stopped] != [0, 0], stopped
    assert all("Traceback" not in err for _, _, err in stopped), stopped[0][2] + stopped[1][2]
    step = torch.load(folders[0] / "checkpoint.pth", weights_only=True)["step"]
    assert 0 < step < 40
    assert not (folders[1] / "checkpoint.pth").exists()   # nothing is written on the other machine

    resumed = finish(start_nodes(folders, "--resume"), folders)
    assert all(code == 0 for code, _, _ in resumed), resumed
    assert f"Resuming from checkpoint.pth at step {step}" in resumed[0][1]
    final = torch.load(folders[0] / "trained_model.pth", weights_only=True)
    expected = torch.load(reference[0] / "trained_model.pth", weights_only=True)
    assert max((final[k] - expected[k]).abs().max().item() for k in final) < 1e-5


def test_when_one_machine_fails_every_process_ends_with_one_line(text_file, tmp_path_factory):
    folders = make_nodes(tmp_path_factory, "failing", text_file)
    (folders[1] / "text.txt").unlink()          # the second machine lacks the text
    results = finish(start_nodes(folders, "--dataset_path", "text.txt", *PLAN), folders)
    for code, out, err in results:
        assert code != 0
        assert one_line(err).startswith("error: "), err
    assert "text.txt" in results[1][2]
    # And a resume where rank 0 has no checkpoint: every process says so in one line.
    results = finish(start_nodes(folders, "--resume"), folders)
    for code, out, err in results:
        assert code != 0
        assert "checkpoint.pth" in one_line(err), err


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from conftest import make_text
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(make_text(400), encoding="utf-8")
    return path
