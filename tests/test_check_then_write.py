"""Check everything, then write: a run that fails on any input leaves every file in its folder
byte-identical, and says so in one line. The folder holds a finished run (config, tokenizer,
weights, log, manifest, checkpoint) that a failed --init_from must not touch."""

import json
import shutil

import pytest
import torch
from conftest import TINY, one_line_error, run_script
from test_gpt2 import save_tiny_gpt2

QUICK = ["--batch_size", "8", "--max_steps", "6", "--eval_interval", "3", "-y"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, text_file):
    folder = tmp_path_factory.mktemp("finished")
    assert run_script("llm_model.py", *TINY, "-y", cwd=folder).returncode == 0
    result = run_script("train_llm.py", "--dataset_path", text_file, *QUICK, cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hub") / "tiny-gpt2")


def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def damaged_gpt2(gpt2_folder, target, kind):
    shutil.copytree(gpt2_folder, target)
    weights = target / "model.safetensors"
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    if kind == "no weights":
        weights.unlink()
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    elif kind == "garbage weights":
        weights.write_bytes(b"\0" * 64)
    elif kind == "heads do not divide n_embd":
        config_path.write_text(json.dumps({**config, "n_head": 3}))
    elif kind == "weights of another shape":
        config_path.write_text(json.dumps({**config, "n_embd": 64}))
    elif kind == "a config that is not a number":
        config_path.write_text(json.dumps({**config, "n_layer": "two"}))
    return target


@pytest.mark.parametrize("kind", ["no weights", "truncated weights", "garbage weights", "heads do not divide n_embd",
                                  "weights of another shape", "a config that is not a number"])
def test_a_bad_gpt2_folder_changes_nothing(finished_run, gpt2_folder, text_file, tmp_path, kind):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    before = snapshot(folder)
    bad = damaged_gpt2(gpt2_folder, tmp_path / "gpt2", kind)
    line = one_line_error(run_script("train_llm.py", "--init_from", bad, "--dataset_path", text_file, *QUICK,
                                     cwd=folder, env={"HF_HUB_OFFLINE": "1"}))
    assert str(bad) in line or "gpt2" in line, line
    assert snapshot(folder) == before


def bad_weights(folder, kind):
    path = folder / "bad.pth"
    if kind == "truncated":
        data = (folder / "trained_model.pth").read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "another shape":
        from custom_llm.model import build_model
        config = torch.load(folder / "model_config.pth", weights_only=True)
        torch.save(build_model({**config, "n_embd": 32, "n_head": 2}).state_dict(), path)
    elif kind == "not weights":
        torch.save({"hello": "world"}, path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "another shape", "not weights"])
def test_bad_trained_weights_change_nothing(finished_run, text_file, tmp_path, kind):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    path = bad_weights(folder, kind)
    before = snapshot(folder)
    line = one_line_error(run_script("train_llm.py", "--init_from", path.name, "--dataset_path", text_file, *QUICK,
                                     cwd=folder))
    assert "bad.pth" in line, line
    assert snapshot(folder) == before


def test_a_missing_text_changes_nothing(finished_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    before = snapshot(folder)
    line = one_line_error(run_script("train_llm.py", "--dataset_path", "nowhere.txt", *QUICK, cwd=folder))
    assert "nowhere.txt" in line
    assert snapshot(folder) == before


def test_resuming_a_finished_run_whose_log_and_manifest_were_deleted(finished_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    for derived in ("training_log.jsonl", "loss_curve.png", "dataset_manifest.json"):
        (folder / derived).unlink()
    result = run_script("train_llm.py", "--resume", cwd=folder)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "curve: none (the log has no rows" in result.stdout
    assert json.loads((folder / "dataset_manifest.json").read_text())   # rebuilt


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from conftest import make_text
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(make_text(300), encoding="utf-8")
    return path
