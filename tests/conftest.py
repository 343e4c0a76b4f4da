"""Shared fixtures: the scripts are run through their real command lines, in temporary folders."""

import json
import os
import pty
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom_llm.corpus import find_documents  # noqa: E402  (after the path is set)
from custom_llm.text_data import text_dataset  # noqa: E402
from custom_llm.files import load_config, load_trained_model  # noqa: E402
from custom_llm.tokenizer import END_OF_TEXT, encode, load_tokenizer  # noqa: E402

# A tiny model shape that trains in seconds on 2 cores.
TINY = ["--n_embd", "64", "--n_head", "4", "--n_layer", "2", "--block_size", "32", "--dropout", "0"]
GPT2 = ["--architecture", "gpt2"]


def prepare(spec, encoding="utf-8", tokenizer=None):
    """The dataset train_llm.py prepares from --dataset_path spec: its documents found, then tokenized."""
    return text_dataset(find_documents(spec, encoding), tokenizer)


def run_script(script, *args, cwd, input=None, timeout=600, env=None):
    """Run one of the four scripts as a user would; stdin is the given text or nothing."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          input=input if input is not None else "", capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(result, exit_code=None):
    """Assert the run failed with exactly one clean line on stderr; return that line."""
    assert result.returncode != 0, result.stdout
    if exit_code is not None:
        assert result.returncode == exit_code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def make_text(n_sentences=1500, seed=0):
    """A small made-up corpus with some structure to learn, plus non-ASCII characters so that
    the tokenizer has multi-byte characters (and merges) to handle."""
    rng = random.Random(seed)
    subjects = ["the miller", "a sailor", "our neighbour", "the old clock", "my sister", "the café owner"]
    verbs = ["mends", "watches", "carries", "forgets", "paints", "counts"]
    objects = ["the boats", "seven apples", "a blue kite", "the letters", "every window", "naïve maps"]
    endings = [".", "!", "?", " — again.", " 🙂.", " (日本)."]
    lines = []
    for i in range(n_sentences):
        line = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
        lines.append(line[0].upper() + line[1:])
        if i % 7 == 6:
            lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------- greedy text, both ways

def pytorch_greedy_tokens(folder, prompt, n):
    model = load_trained_model(str(folder / "trained_model.pth"), load_config(str(folder / "model_config.pth")))
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    prompt_ids = encode(tokenizer, prompt)
    out = model.generate(torch.tensor([prompt_ids]), n, temperature=0)[0].tolist()
    return tokenizer, out[len(prompt_ids):]


def gguf_greedy(folder, prompt, n, gguf="model.gguf"):
    """inference_gguf.py --json at temperature 0: (generated ids, text, why it stopped)."""
    result = run_script("inference_gguf.py", "--gguf_path", gguf, "--query", prompt, "--temperature", "0",
                        "--max_tokens", n, "--json", cwd=folder)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    return answer["tokens"], answer["text"], answer["stop_reason"]


def assert_same_greedy_text(folder, prompt, n, gguf="model.gguf"):
    """The GGUF's greedy continuation is PyTorch generate()'s, up to <|endoftext|> where the GGUF stops."""
    tokenizer, expected = pytorch_greedy_tokens(folder, prompt, n)
    got, text, stop_reason = gguf_greedy(folder, prompt, n, gguf)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eot in expected:   # inference stops there and reports the tokens before it
        expected = expected[:expected.index(eot)]
        assert stop_reason == "end_of_text"
    assert got == expected
    assert text == tokenizer.decode([t for t in expected if t != eot], skip_special_tokens=False)
    return expected


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def run_pipeline(folder, model_args, train_args):
    """llm_model.py, train_llm.py and convert_to_gguf.py in folder, each asserted to have
    succeeded: {stage: its result}."""
    results = {"config": run_script("llm_model.py", *model_args, cwd=folder),
               "train": run_script("train_llm.py", *train_args, cwd=folder),
               "convert": run_script("convert_to_gguf.py", cwd=folder)}
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"
    return results


def interrupted_run(folder, train_args, log_lines=2):
    """train_llm.py started in folder and stopped with Ctrl-C (SIGINT) once its log has log_lines
    lines; asserts it ended as an interrupted run does (exit 130). Its stderr."""
    process = subprocess.Popen([sys.executable, str(REPO / "train_llm.py"), *map(str, train_args)], cwd=folder,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = Path(folder) / "training_log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= log_lines):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    return err


def assert_resume_ends_as_uninterrupted(tmp_path, model_args, plan):
    """The same plan trained in two folders of tmp_path: once through, once stopped with Ctrl-C
    and resumed; the final weights must agree. (the resumed folder, the checkpoint's step, the
    resumed run's result)."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    for folder in (reference, interrupted):
        folder.mkdir()
        assert run_script("llm_model.py", *model_args, "-y", cwd=folder).returncode == 0
    assert run_script("train_llm.py", *plan, cwd=reference).returncode == 0
    interrupted_run(interrupted, plan)
    step = torch.load(interrupted / "checkpoint.pth", weights_only=True)["step"]
    resumed = run_script("train_llm.py", "--resume", cwd=interrupted)
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(interrupted / "trained_model.pth", weights_only=True)
    expected = torch.load(reference / "trained_model.pth", weights_only=True)
    assert all(torch.allclose(final[k], expected[k], atol=1e-5) for k in final)
    return interrupted, step, resumed


@pytest.fixture(scope="session")
def trained(tmp_path_factory, text_file):
    """A folder where the whole pipeline ran once: config, tokenizer, trained model, exports (the
    default architecture: windowed)."""
    folder = tmp_path_factory.mktemp("pipeline")
    return folder, run_pipeline(folder, [*TINY, "-y"], ["--dataset_path", text_file, "--max_steps", "300",
                                                        "--learning_rate", "0.003", "--batch_size", "32", "-y"])


@pytest.fixture(scope="session")
def gpt2_trained(tmp_path_factory, text_file):
    """The same with GPT-2's graph (--architecture gpt2: learned positions, exact within its block,
    the context rule past it), for what only such a model does."""
    folder = tmp_path_factory.mktemp("gpt2_pipeline")
    return folder, run_pipeline(folder, [*GPT2, *TINY, "-y"], ["--dataset_path", text_file, "--max_steps", "300",
                                                               "--learning_rate", "0.003", "--batch_size", "32", "-y"])


class Terminal:
    """A script running in a pseudo-terminal, driven as a person would type."""

    def __init__(self, script, *args, cwd):
        pid, fd = pty.fork()
        if pid == 0:  # child
            os.chdir(cwd)
            os.execv(sys.executable, [sys.executable, str(REPO / script), *map(str, args)])
        self.pid, self.fd, self.output, self.matched = pid, fd, "", 0

    def read_until(self, text, timeout=60):
        """Wait for text to appear in output not yet matched by an earlier read_until."""
        deadline = time.time() + timeout
        while text not in self.output[self.matched:]:
            if time.time() > deadline:
                raise AssertionError(f"did not see {text!r} in:\n{self.output}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        self.matched += self.output[self.matched:].index(text) + len(text)
        return self.output

    def send(self, text):
        os.write(self.fd, text.encode())

    def wait(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                self.output += chunk.decode("utf-8", "replace")
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError(f"still running after {timeout}s:\n{self.output}")
