"""Fine-tuning a GPT-2-family model: train_llm.py --init_from a Hugging Face folder, through all four
stages. The folder is a tiny GPT2LMHeadModel with random weights and a GPT-2-style byte-level BPE
trained here, saved with save_pretrained: nothing is downloaded."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, assert_same_greedy_text, make_text, one_line_error, run_script

from custom_llm.checks import HARD_STRINGS
from custom_llm.errors import UserError
from custom_llm.gpt2_folder import load_gpt2_model, load_gpt2_tokenizer, read_gpt2_folder
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import END_OF_TEXT, encode, load_tokenizer

FINE_TUNE = ["--max_steps", "30", "--batch_size", "8", "--eval_interval", "10", "-y"]


def save_tiny_gpt2(folder):
    """A GPT2LMHeadModel (n_embd 32, 2 layers, 2 heads, 64 positions) with GPT-2's tied head, and a
    byte-level BPE of a few hundred tokens built as GPT-2's is, wrapped as a GPT2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([make_text(300, seed=5)], trainer=trainer)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                       n_head=2, bos_token_id=eot, eos_token_id=eot))
    model.save_pretrained(folder)
    GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                      unk_token=END_OF_TEXT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hub") / "tiny-gpt2")


@pytest.fixture(scope="session")
def fine_tuned(tmp_path_factory, gpt2_folder, text_file):
    """A folder where the tiny GPT-2 was fine-tuned on the test text, then exported (F16, F32 and
    two quantized types), with what each stage printed."""
    folder = tmp_path_factory.mktemp("fine_tuned")
    results = {"train": run_script("train_llm.py", "--init_from", gpt2_folder, "--dataset_path", text_file,
                                   *FINE_TUNE, cwd=folder, env={"HF_HUB_OFFLINE": "1"}),
               "convert": run_script("convert_to_gguf.py", "--quant_type", "F32,Q8_0,Q4_0", cwd=folder)}
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"
    return folder, results


def hf_model_and_tokenizer(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(folder, local_files_only=True))


# ------------------------------------------------------------------------- loading

def test_the_loaded_model_is_the_hf_model(gpt2_folder):
    """Before any training: the same logits (the Conv1D mapping, the tied head) and the same tokens."""
    config, tokenizer = read_gpt2_folder(str(gpt2_folder))
    model = load_gpt2_model(str(gpt2_folder), {**config, "dropout": 0.0})
    hf_model, hf_tokenizer = hf_model_and_tokenizer(gpt2_folder)
    ids = torch.tensor([encode(tokenizer, "The sailor paints the boats. " * 4)[:64]])
    with torch.no_grad():
        expected, got = hf_model(ids).logits, model(ids)[0]
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    for text in HARD_STRINGS:
        assert encode(tokenizer, text) == hf_tokenizer.encode(text, add_special_tokens=False), text
    assert config == {"vocab_size": tokenizer.get_vocab_size(), "n_embd": 32, "n_head": 2, "n_layer": 2,
                      "block_size": 64}


def test_a_folder_with_only_vocab_and_merges(gpt2_folder, tmp_path):
    """Older GPT-2 folders have vocab.json + merges.txt and no tokenizer.json: the same tokenizer."""
    folder = tmp_path / "old-style"
    shutil.copytree(gpt2_folder, folder)
    full = load_gpt2_tokenizer(str(folder))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer"):
        load_gpt2_tokenizer(str(folder))
    full.model.save(str(folder))   # a BPE model saves as vocab.json + merges.txt
    assert load_gpt2_tokenizer(str(folder)).to_str() == full.to_str()


def test_a_hub_name_says_to_download_first(tmp_path):
    line = one_line_error(run_script("train_llm.py", "--init_from", "gpt2", "-y", cwd=tmp_path,
                                     env={"HF_HUB_OFFLINE": "1"}), 2)
    assert "download it first" in line and "huggingface-cli download gpt2 --include" in line and "--local-dir gpt2" in line


@pytest.mark.parametrize("key,value", [("activation_function", "relu"), ("layer_norm_epsilon", 1e-6),
                                       ("scale_attn_by_inverse_layer_idx", True), ("model_type", "llama")])
def test_graphs_other_than_gpt2s_are_refused_in_one_line(gpt2_folder, tmp_path, text_file, key, value):
    folder = tmp_path / "other"
    shutil.copytree(gpt2_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    line = one_line_error(run_script("train_llm.py", "--init_from", folder, "--dataset_path", text_file, "-y",
                                     cwd=tmp_path), 2)
    assert (key if key != "model_type" else "'llama' model") in line


# ------------------------------------------------------------------------- training

def test_fine_tuning_writes_config_tokenizer_and_its_own_log(fine_tuned, gpt2_folder, text_file):
    folder, results = fine_tuned
    out = results["train"].stdout
    assert "adamw, peak learning rate 0.0001" in out            # the fine-tuning default, not 0.015
    assert "log: finetune_log.jsonl, curve: finetune_loss_curve.png" in out
    assert "Speed: about" in out and "the plan of 30 steps takes about" in out
    assert (folder / "finetune_log.jsonl").exists() and (folder / "finetune_loss_curve.png").exists()
    assert not (folder / "training_log.jsonl").exists()
    config = torch.load(folder / "model_config.pth", weights_only=True)
    assert {k: config[k] for k in ("vocab_size", "n_embd", "n_head", "n_layer", "block_size")} == \
        read_gpt2_folder(str(gpt2_folder))[0]
    assert config["tokenizer"] == "bpe" and config["dataset_path"] == str(text_file)
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    assert tokenizer.to_str() == load_gpt2_tokenizer(str(gpt2_folder)).to_str()


def test_explicit_learning_rate_wins_and_minutes_work(gpt2_folder, text_file, tmp_path):
    result = run_script("train_llm.py", "--init_from", gpt2_folder, "--dataset_path", text_file, "--minutes", "0.15",
                        "--learning_rate", "0.002", "--batch_size", "8", "--memory_gb", "0.01", "-y", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "adamw, peak learning rate 0.002" in result.stdout
    assert "steps fit in 0.15 min" in result.stderr
    assert "run 1 at a time to fit --memory_gb 0.01 (even one at a time needs about" in result.stdout


def test_a_config_already_there_keeps_its_other_keys(gpt2_folder, text_file, tmp_path):
    assert run_script("llm_model.py", *TINY, "--tokenizer", "bpe", "-y", cwd=tmp_path).returncode == 0
    config = torch.load(tmp_path / "model_config.pth", weights_only=True)
    torch.save({**config, "note": "mine"}, tmp_path / "model_config.pth")
    result = run_script("train_llm.py", "--init_from", gpt2_folder, "--dataset_path", text_file, "--max_steps", "2",
                        "--batch_size", "4", "-y", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = torch.load(tmp_path / "model_config.pth", weights_only=True)
    assert config["note"] == "mine" and config["n_embd"] == 32 and config["block_size"] == 64


# ------------------------------------------------------------------------- the exports

def test_every_export_passes_its_check(fine_tuned):
    folder, results = fine_tuned
    checks = [line for line in results["convert"].stdout.splitlines() if line.startswith("Check ")]
    assert len(checks) == 5   # hf_model/, model.gguf (F16), F32, Q8_0, Q4_0
    for line in checks:
        assert f"tokenization {len(HARD_STRINGS)}/{len(HARD_STRINGS)} strings equal" in line, line


def test_llama_cpp_tokenizes_like_the_tokenizer(fine_tuned):
    folder, _ = fine_tuned
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    gguf = GGUFModel(str(folder / "model.gguf.F32.gguf"))
    for text in HARD_STRINGS + [make_text(20, seed=9)]:
        assert gguf.tokenize(text) == encode(tokenizer, text), text


def test_greedy_text_from_the_f32_gguf_equals_pytorch(fine_tuned):
    folder, _ = fine_tuned
    assert_same_greedy_text(folder, "The miller mends", 3 * 64, gguf="model.gguf.F32.gguf")   # past the context


def test_the_hf_export_reloads_in_transformers(fine_tuned):
    folder, _ = fine_tuned
    hf_model, hf_tokenizer = hf_model_and_tokenizer(folder / "hf_model")
    ids = hf_tokenizer.encode("A sailor counts seven apples.", add_special_tokens=False)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].numpy()
    assert np.isfinite(logits).all() and logits.shape == (len(ids), hf_tokenizer.vocab_size)
