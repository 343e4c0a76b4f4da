"""llama.cpp's part of convert_to_gguf.py's checks and report (and a conversation held as
llama-cpp-python's users hold one, for the tests and benchmarks), run in a child process that
never imports torch.

llama.cpp can end its whole process: an assert that aborts, a segfault in a backend (one was seen
at model load on a GPU machine, in a process that also held torch's CUDA libraries). Run here, such
a death is an answer: LlamaCrash, which the caller turns into one line naming the file and the
check, with the exports treated as for a failed check.

    python -m custom_llm.isolated JOB INPUT OUTPUT     # what run() starts; INPUT/OUTPUT: pickles
"""

import os
import pickle
import signal
import subprocess
import sys
import tempfile

from custom_llm.errors import UserError


class LlamaCrash(Exception):
    """The child died by a signal (or exited without an answer) while llama.cpp worked."""


def child_command(job: str, input_path: str, output_path: str) -> list:
    return [sys.executable, "-m", "custom_llm.isolated", job, input_path, output_path]


def run(job: str, **payload):
    """JOB's answer, computed in a child process. A UserError there is raised here as it was."""
    with tempfile.TemporaryDirectory(prefix="custom-llm-check-") as folder:
        input_path, output_path = os.path.join(folder, "input"), os.path.join(folder, "output")
        with open(input_path, "wb") as f:
            pickle.dump(payload, f)
        # The scripts run from the user's folder: the child finds this package where this one was found.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                          os.environ.get("PYTHONPATH")]))}
        child = subprocess.run(child_command(job, input_path, output_path), stdin=subprocess.DEVNULL, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        if child.returncode < 0:
            name = signal.Signals(-child.returncode).name
            raise LlamaCrash(f"llama.cpp crashed ({name})")
        if not os.path.exists(output_path):
            said = [line.strip() for line in child.stderr.splitlines() if line.strip()]
            raise LlamaCrash(f"llama.cpp stopped without an answer (exit status {child.returncode}"
                             + (f": {said[-1][:160]}" if said else "") + ")")
        with open(output_path, "rb") as f:
            answer = pickle.load(f)
    if "error" in answer:
        raise UserError(*answer["error"])
    return answer["result"]


def read_back(path: str, strings: list, windows: list):
    """(each string's tokens, each window's logits) from the GGUF at path, through llama.cpp."""
    return run("read_back", path=path, strings=strings, windows=windows)


def scores(path: str, windows: list):
    """evaluation.Scores of the GGUF at path on [(inputs, targets)] windows."""
    return run("scores", path=path, windows=windows)


def greedy(path: str, prompt: list, max_tokens: int) -> list:
    """The greedy continuation of prompt (ids) by the GGUF at path through inference's own
    generation (runtime.GGUFModel.generate), up to its stop token."""
    return run("greedy", path=path, prompt=prompt, max_tokens=max_tokens)


def chat(path: str, conversations: list, max_tokens: list):
    """[(prompt ids, greedy answer ids)] of each conversation through llama-cpp-python's own chat
    completion, with the GGUF's own template (export.Format.chat_read_back)."""
    return run("chat", path=path, conversations=conversations, max_tokens=max_tokens)


def converse(path: str, conversations: list, max_tokens: int):
    """(each conversation's answers, one text per user message, and the context llama.cpp opened):
    the messages asked one by one as a user of llama-cpp-python holds a conversation, each answer
    kept for the next turn. Llama at its defaults (n_ctx 512, f16 cache), the file's chat
    template, create_chat_completion at temperature 0. A conversation that outgrows the context
    is refused by llama-cpp-python (a ValueError): that answer is None, and the conversation ends."""
    return run("converse", path=path, conversations=conversations, max_tokens=max_tokens)


# ------------------------------------------------------------------ the child

def _logits_model(path, windows):
    """The GGUF, to read each window's logits in one pass: a windowed one in a context of the
    longest (the checks' long pass), not of its default (logits_all keeps a row per position)."""
    from custom_llm.runtime import GGUFModel, check_gguf
    longest = max((len(w) for w in windows), default=0)
    return GGUFModel(path, logits_all=True, n_ctx=longest if check_gguf(path).windowed else None)


def _read_back(path, strings, windows):
    model = _logits_model(path, windows)
    return [model.tokenize(s) for s in strings], [model.logits(w) for w in windows]


def _scores(path, windows):
    from custom_llm.evaluation import score
    return score(_logits_model(path, [inputs for inputs, _ in windows]).logits, windows)


def _greedy(path, prompt, max_tokens):
    import numpy as np
    from custom_llm.runtime import GGUFModel
    return list(GGUFModel(path).generate(list(prompt), max_tokens, lambda logits: int(np.argmax(logits))))


def _chat(path, conversations, max_tokens):
    """As a user of llama-cpp-python runs a chat GGUF: Llama with the file's chat template, and
    create_chat_completion, greedy. A logits processor sees each draw: the tokens evaluated before
    the first are the prompt's, and each draw's choice (greedy: the likeliest) is the answer's next
    token, the one that ends it included. At its max tokens the processor ends the answer itself:
    llama-cpp-python 0.3.36 does not while the text ends in an incomplete UTF-8 character, and
    runs on until the context is full."""
    import numpy as np
    from llama_cpp import LogitsProcessorList
    from custom_llm.runtime import open_llama
    llm, _ = open_llama(path)   # Llama at its defaults, with a context of the trained block
    answers = []
    for messages, n in zip(conversations, max_tokens):
        prompt, answer = [], []

        def record(input_ids, scores):
            if len(answer) >= n:     # the answer's max tokens: make the next draw end it
                scores[:] = -np.inf
                scores[llm.token_eos()] = 0.0
                return scores
            if not answer and not prompt:
                prompt.extend(int(t) for t in input_ids)
            answer.append(int(np.argmax(scores)))
            return scores

        llm.create_chat_completion(messages=messages, max_tokens=n + 1, temperature=0,
                                   logits_processor=LogitsProcessorList([record]))
        answers.append((prompt, answer[:n]))
    return answers


def _converse(path, conversations, max_tokens):
    from llama_cpp import Llama
    from custom_llm.runtime import no_weight_repacking
    with no_weight_repacking():    # as the project loads a GGUF: AMX repacking crashes quantized files
        llm = Llama(model_path=path, verbose=False)
    answers = []
    for questions in conversations:
        messages, said = [], []
        for question in questions:
            messages.append({"role": "user", "content": question})
            try:
                reply = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0)
            except ValueError:     # "Requested tokens (547) exceed context window of 512"
                said.append(None)
                break
            said.append(reply["choices"][0]["message"]["content"] or "")
            messages.append({"role": "assistant", "content": said[-1]})
        answers.append(said)
    return answers, llm.n_ctx()


JOBS = {"read_back": _read_back, "scores": _scores, "chat": _chat, "greedy": _greedy, "converse": _converse}


def _child(job: str, input_path: str, output_path: str) -> None:
    with open(input_path, "rb") as f:
        payload = pickle.load(f)
    try:
        answer = {"result": JOBS[job](**payload)}
    except UserError as err:
        answer = {"error": (str(err), err.exit_code)}
    with open(output_path, "wb") as f:
        pickle.dump(answer, f)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
