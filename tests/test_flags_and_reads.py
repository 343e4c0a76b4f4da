"""Every numeric flag of the four scripts has its range in flags.NUMBERS; a file that cannot be
read says why (permissions, a folder), never that it is damaged."""

import builtins
import os

import pytest
from conftest import one_line_error, run_script

import convert_to_gguf
import inference_gguf
import llm_model
import train_llm
from custom_llm import cli
from custom_llm.errors import UserError
from custom_llm.files import load_config, load_trained_model
from custom_llm.flags import NUMBERS
from custom_llm.runtime import GGUFModel
from custom_llm.textfile import file_hash
from custom_llm.tokenizer import load_tokenizer


class Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(entry, monkeypatch):
    """The ArgumentParser a script builds, caught when it parses."""
    def capture(self, *args, **kwargs):
        raise Parsed(self)
    monkeypatch.setattr(cli.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        entry()
    return parsed.value.parser


def test_every_numeric_flag_has_a_range(monkeypatch):
    used = set()
    for script, entry in [("llm_model.py", llm_model.main), ("train_llm.py", train_llm.parse_args),
                          ("convert_to_gguf.py", convert_to_gguf.parse_args), ("inference_gguf.py", inference_gguf.main)]:
        parser = parser_of(entry, monkeypatch)
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:   # --help and on/off switches
                continue
            numeric = action.dest in NUMBERS or action.type in (int, float) or \
                (isinstance(action.default, (int, float)) and not isinstance(action.default, bool))
            if numeric:
                assert action.dest in parser.checks, f"{script} --{action.dest} is not checked against a range"
                assert NUMBERS[action.dest].describe() in (action.help or ""), f"{script} --{action.dest}: --help"
        used |= set(parser.checks) & set(NUMBERS)
    assert used == set(NUMBERS), f"ranges no script uses: {set(NUMBERS) - used}"


# ---------------------------------------------------------------------- reading

def unreadable(path, monkeypatch):
    """Make path unreadable: for real for a user; as root (whom permissions do not stop), by
    making open() refuse it the way the system would."""
    if os.geteuid() != 0:
        os.chmod(path, 0)
        return
    target, real_open = os.path.abspath(path), builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) == target:
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing_open)


@pytest.mark.parametrize("name,load", [
    ("model_config.pth", lambda p: load_config(p)),
    ("trained_model.pth", lambda p: load_trained_model(p, {})),
    ("tokenizer.json", lambda p: load_tokenizer(p)),
    ("model.gguf", lambda p: GGUFModel(p)),
    ("story.txt", lambda p: file_hash(p)),
])
def test_a_file_that_cannot_be_read_says_so(trained, tmp_path, monkeypatch, name, load):
    folder, _ = trained
    path = tmp_path / name
    path.write_bytes((folder / name).read_bytes() if (folder / name).exists() else b"some text\n")
    unreadable(path, monkeypatch)
    with pytest.raises(UserError) as failure:
        load(str(path))
    message = str(failure.value)
    assert message == f"{path} cannot be read (permission denied): check its permissions"
    assert "damaged" not in message and "truncated" not in message


@pytest.mark.parametrize("script,flag", [("convert_to_gguf.py", "--model_path"), ("convert_to_gguf.py", "--config_path"),
                                         ("convert_to_gguf.py", "--tokenizer_path"), ("inference_gguf.py", "--gguf_path")])
def test_a_folder_given_for_a_file_says_so(trained, tmp_path, script, flag):
    folder, _ = trained
    (tmp_path / "a-folder").mkdir()
    query = ["--query", "x"] if script == "inference_gguf.py" else []
    line = one_line_error(run_script(script, flag, tmp_path / "a-folder", *query, cwd=folder), 2)
    assert "a-folder is a folder" in line and "damaged" not in line
