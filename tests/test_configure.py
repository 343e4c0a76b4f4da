"""llm_model.py: questions, flags, piped answers, invalid answers, the saved config."""

import pytest
import torch
from conftest import Terminal, one_line_error, run_script

from custom_llm.model import CONFIG_KEYS, build_model, count_parameters
from custom_llm.tokenizer import build_char_tokenizer

# The char tokenizer's vocabulary comes from the text; until train_llm.py counts it, the config
# holds the smallest one (the 256 bytes and the special tokens).
SMALLEST_CHAR_VOCABULARY = build_char_tokenizer([]).get_vocab_size()
DEFAULTS = {"vocab_size": SMALLEST_CHAR_VOCABULARY, "n_embd": 256, "n_head": 8, "n_layer": 6, "block_size": 128,
            "dropout": 0.1}


def saved_config(folder):
    return torch.load(folder / "model_config.pth", weights_only=True)


def test_piped_answers_are_taken_in_order(tmp_path):
    result = run_script("llm_model.py", cwd=tmp_path, input="500\n96\n6\n3\n48\n0.05\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Configure your LLM model:")
    config = saved_config(tmp_path)
    assert {k: config[k] for k in CONFIG_KEYS} == {
        "vocab_size": 500, "n_embd": 96, "n_head": 6, "n_layer": 3, "block_size": 48, "dropout": 0.05}
    assert config["tokenizer"] == "bpe"
    assert f"{count_parameters(config) / 1e6:.2f}M parameters with a BPE vocabulary of 500" in result.stdout


def test_char_vocabulary_is_one_token_per_character(tmp_path):
    result = run_script("llm_model.py", cwd=tmp_path, input="char\n96\n6\n3\n48\n0.05\n")
    assert result.returncode == 0, result.stderr
    config = saved_config(tmp_path)
    assert (config["tokenizer"], config["vocab_size"], config["n_embd"], config["dropout"]) == \
        ("char", SMALLEST_CHAR_VOCABULARY, 96, 0.05)
    # The count without the vocabulary's rows, what each entry adds, and the count at the smallest.
    without_vocabulary = count_parameters({**config, "vocab_size": 0})
    assert f"{without_vocabulary / 1e6:.2f}M parameters plus 2 x 96 per vocabulary entry" in result.stdout
    assert f"{count_parameters(config) / 1e6:.2f}M at the smallest" in result.stdout
    assert count_parameters({**config, "vocab_size": 1}) - without_vocabulary == 2 * 96


def test_vocabulary_size_with_the_char_tokenizer_is_a_usage_error(tmp_path):
    line = one_line_error(run_script("llm_model.py", "--tokenizer", "char", "--vocab_size", "500", "-y",
                                     cwd=tmp_path), 2)
    assert "--vocab_size" in line and "--tokenizer char" in line
    assert not (tmp_path / "model_config.pth").exists()


def test_tokenizer_flag_alone_chooses_the_kind(tmp_path):
    assert run_script("llm_model.py", "--tokenizer", "bpe", "-y", cwd=tmp_path).returncode == 0
    config = saved_config(tmp_path)
    assert (config["tokenizer"], config["vocab_size"]) == ("bpe", 10000)


@pytest.mark.parametrize("given", [["--vocab_size", "65"], ["--vocab_size", "257"]])
def test_a_bpe_too_small_for_its_bytes_is_refused_at_the_first_stage(tmp_path, given):
    line = one_line_error(run_script("llm_model.py", *given, "-y", cwd=tmp_path), 2)
    assert f"{given[1]} tokens cannot hold the 256 byte tokens" in line and "258 or more" in line and "char" in line
    assert not (tmp_path / "model_config.pth").exists()


def test_the_seed_session_gives_a_working_model(tmp_path, text_file):
    """The tutorial's answers, piped in its order: vocabulary, embedding, heads, layers, context,
    dropout. They make a BPE model that trains."""
    result = run_script("llm_model.py", cwd=tmp_path, input="5000\n64\n4\n2\n64\n0.0\n")
    assert result.returncode == 0, result.stderr
    config = saved_config(tmp_path)
    assert {k: config[k] for k in CONFIG_KEYS} == {"vocab_size": 5000, "n_embd": 64, "n_head": 4, "n_layer": 2,
                                                   "block_size": 64, "dropout": 0.0}
    assert config["tokenizer"] == "bpe"
    trained = run_script("train_llm.py", "--dataset_path", text_file, "--max_steps", "3", "--eval_interval", "3",
                         "-y", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "BPE tokenizer" in trained.stdout and (tmp_path / "trained_model.pth").exists()


def test_end_of_input_takes_remaining_defaults(tmp_path):
    result = run_script("llm_model.py", cwd=tmp_path, input="777\n\n4\n")
    assert result.returncode == 0, result.stderr
    config = saved_config(tmp_path)
    assert config["vocab_size"] == 777 and config["n_embd"] == 256 and config["n_head"] == 4
    assert config["n_layer"] == 6 and config["block_size"] == 128 and config["dropout"] == 0.1


def test_flags_are_not_asked(tmp_path):
    result = run_script("llm_model.py", "--n_embd", "128", "--dropout", "0", cwd=tmp_path,
                        input="300\n4\n2\n64\n")
    assert result.returncode == 0, result.stderr
    assert "Embedding size" not in result.stdout and "Dropout" not in result.stdout
    config = saved_config(tmp_path)
    assert (config["vocab_size"], config["n_embd"], config["n_head"], config["n_layer"],
            config["block_size"], config["dropout"]) == (300, 128, 4, 2, 64, 0.0)


def test_yes_takes_defaults_and_config_is_plain_data(tmp_path):
    result = run_script("llm_model.py", "--yes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = saved_config(tmp_path)  # weights_only=True: nothing but plain data inside
    assert {k: config[k] for k in CONFIG_KEYS} == DEFAULTS
    model = build_model(config)
    assert model.num_parameters() == count_parameters(config)


@pytest.mark.parametrize("flag,value,reason", [
    ("--vocab_size", "lots", "neither char nor a whole number"),
    ("--n_embd", "0", "positive"),
    ("--n_layer", "-3", "positive"),
    ("--block_size", "12.5", "not a whole number"),
    ("--dropout", "1", "below 1"),
    ("--dropout", "-0.1", "at least 0"),
    ("--dropout", "abc", "not a number"),
])
def test_invalid_flag_is_one_line_usage_error(tmp_path, flag, value, reason):
    result = run_script("llm_model.py", flag, value, "-y", cwd=tmp_path)
    line = one_line_error(result, exit_code=2)
    assert flag in line and reason in line
    assert not (tmp_path / "model_config.pth").exists()


def test_n_embd_must_divide_by_n_head(tmp_path):
    line = one_line_error(run_script("llm_model.py", "--n_embd", "100", "--n_head", "8", "-y", cwd=tmp_path), 2)
    assert "not divisible" in line and "100" in line


def test_invalid_piped_answer_is_one_line_usage_error(tmp_path):
    line = one_line_error(run_script("llm_model.py", cwd=tmp_path, input="char\n64\n5\n"), 2)
    assert "n_head" in line and "not divisible" in line
    assert not (tmp_path / "model_config.pth").exists()


def test_terminal_reasks_invalid_answers(tmp_path):
    term = Terminal("llm_model.py", cwd=tmp_path)
    term.read_until("[char]:")
    term.send("many\n")
    term.read_until("please try again")
    term.send("2000\n")
    term.read_until("Embedding size")
    term.send("\n")
    term.read_until("attention heads")
    term.send("7\n")  # 256 is not divisible by 7
    term.read_until("not divisible")
    term.send("4\n")
    term.read_until("layers")
    term.send("\x04")  # Ctrl-D: defaults for the rest
    assert term.wait() == 0, term.output
    config = saved_config(tmp_path)
    assert (config["vocab_size"], config["n_embd"], config["n_head"], config["n_layer"]) == (2000, 256, 4, 6)


def test_train_without_config_says_what_to_run(tmp_path):
    line = one_line_error(run_script("train_llm.py", "-y", cwd=tmp_path))
    assert "model_config.pth" in line and "llm_model.py" in line
