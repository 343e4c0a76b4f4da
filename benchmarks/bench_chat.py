"""Proof that a chat model answers: exact-match accuracy on held-out questions, in PyTorch and in
the F16 and Q4_0 GGUFs, after a few minutes of training.

    python benchmarks/bench_chat.py                    # 4 minutes of training, 200 held-out questions
    python benchmarks/bench_chat.py --minutes 5 --keep
    python benchmarks/bench_chat.py --tasks add        # two-digit addition on its own
    python benchmarks/bench_chat.py --workdir DIR      # score again a folder kept with --keep (same flags)
    python benchmarks/bench_chat.py --write_data chats.jsonl   # only the training conversations
    python benchmarks/bench_chat.py --turns 10 --architecture gpt2   # conversations of 1 to 10 turns;
                                                       # exact match by turn number (below)

The conversations are made here, from a seed, so that every answer can be scored exactly:

  * spell:   "Spell tokavi."           -> "t-o-k-a-v-i"
  * reverse: "Write tokavi backwards." -> "ivakot"
  * add:     "What is 47 + 38?"        -> "85"

Why these tasks: an answer is right or wrong to the character, with no judge. The words are made
up from syllables and the held-out questions ask about words (and pairs of numbers) that never
occur in the training file, so a model that learned answers by heart scores nothing on them: it
has to read the question, find the word in it and copy its letters in order (spell) or in reverse
order (reverse), or work out the digits with their carries (add). Each task is asked in four
phrasings; some conversations open with a system message, and some ask their question after an
earlier question and its answer, so the model must answer the last question, not the first. The
answer must come on its own and end its turn, which is what answering asks of a chat model. The
word tasks suit the default character tokenizer (a letter is a token) and are the default set.
Addition is the harder task: it needs more of the few minutes, so it is measured on its own
(--tasks add) rather than sharing them with the word tasks; --tasks spell,reverse,add trains one
model on all three.

Stages run as a user runs them, in a temporary folder: llm_model.py (the shape flags below),
train_llm.py --dataset_path train.jsonl --minutes M (the project's default recipe otherwise), and
convert_to_gguf.py. Then each held-out question is answered greedily, up to --max_tokens tokens
(fewer where the block has less room left; a question always leaves at least ANSWER_ROOM): by the
PyTorch model (ChatFormat and greedy_answer) and by llama-cpp-python's create_chat_completion on
model.gguf (F16) and model.gguf.Q4_0.gguf, each answer decoded with the same tokenizer. Exact
match: the answer's text, up to its end-of-turn token, equals the expected text once whitespace
at both ends is stripped. Ended: the answer ended with the end-of-turn token within the limit.
Same answer as PyTorch: the two answer texts are equal, unstripped. Every figure is printed
beside the CPU it was measured on.

With --turns N (N > 1), the training conversations hold 1 to N questions each (as many of each
count), each answered, and the held-out set is --conversations conversations of exactly N turns,
every turn about a held-out word, each drawn until it fits llama-cpp-python's default context of
LLAMA_DEFAULT_CONTEXT tokens with ANSWER_ROOM to spare (with the expected answers; a model's own
answers may be longer). Each conversation is then held as a user holds one: the questions asked
one by one, each reader's own earlier answers kept in the conversation, by three readers:
  PyTorch                   the trained model's generate(), greedy, the conversation so far as prompt;
  create_chat_completion    llama-cpp-python's Llama(model_path) at its defaults (n_ctx 512, f16
                            cache) on model.gguf (F16), temperature 0, in a child process;
  inference_gguf.py --chat  the script, its questions piped in, --temperature 0 --json.
Printed: exact match by turn number for each, and the prompt's length in tokens at that turn,
so where the block is passed shows.
"""

import argparse
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from custom_llm.chat_format import END_OF_TURN, TURN_START, render  # noqa: E402
from custom_llm.precision import cpu_summary  # noqa: E402

# ------------------------------------------------------------------------------ the data set

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
CODAS = "lnrs"

TASKS = ("spell", "reverse", "add")
WORD_TASKS = ("spell", "reverse")
PHRASINGS = {
    "spell": ["Spell {w}.", "How do you spell {w}?", "Spell the word {w} letter by letter.", "{w}: spell it."],
    "reverse": ["Reverse {w}.", "Write {w} backwards.", "What is {w} spelled backwards?", "{w} reversed?"],
    "add": ["What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} =", "What do {a} and {b} make?"],
}
SYSTEM_MESSAGES = ["Answer with the result only.", "You are a patient tutor. Reply briefly.",
                   "Be exact.", "Give the answer and nothing else."]
SYSTEM_SHARE = 0.2           # conversations that open with a system message
EARLIER_SHARE = 0.15         # conversations whose question follows an earlier question and its answer
ANSWER_ROOM = 24             # a held-out question leaves at least this many tokens of the block to answer in
LLAMA_DEFAULT_CONTEXT = 512  # llama_cpp.Llama's n_ctx when none is given (llama-cpp-python 0.3.36)


def made_up_word(rng: random.Random) -> str:
    """Two or three syllables: consonant and vowel, sometimes closed by l, n, r or s (4 to 9 letters)."""
    word = ""
    for _ in range(rng.choice((2, 2, 3))):
        word += rng.choice(CONSONANTS) + rng.choice(VOWELS)
        if rng.random() < 0.2:
            word += rng.choice(CODAS)
    return word


def answer_for(task: str, item) -> str:
    if task == "spell":
        return "-".join(item)
    if task == "reverse":
        return item[::-1]
    return str(item[0] + item[1])


def ask(task: str, item, rng: random.Random) -> str:
    template = rng.choice(PHRASINGS[task])
    return template.format(a=item[0], b=item[1]) if task == "add" else template.format(w=item)


def follows_earlier(messages) -> bool:
    return sum(m["role"] == "user" for m in messages) > 1


def n_tokens(messages, add_generation_prompt=False) -> int:
    """The conversation's length in tokens with a character tokenizer: one per character, one per
    special token."""
    text = render(messages, add_generation_prompt)
    return (len(text) - text.count(TURN_START) * (len(TURN_START) - 1)
            - text.count(END_OF_TURN) * (len(END_OF_TURN) - 1))


class Items:
    """Made-up words and number pairs: the held-out ones drawn first, the training ones never among them."""

    def __init__(self, rng: random.Random, n_words: int, n_pairs: int):
        self.rng = rng
        self.held_words = []
        while len(self.held_words) < n_words:
            word = made_up_word(rng)
            if word not in self.held_words:
                self.held_words.append(word)
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
        rng.shuffle(pairs)
        self.held_pairs, self.train_pairs = pairs[:n_pairs], pairs[n_pairs:]
        self.excluded = set(self.held_words)

    def training_item(self, task: str):
        if task == "add":
            return self.rng.choice(self.train_pairs)
        word = made_up_word(self.rng)
        while word in self.excluded:
            word = made_up_word(self.rng)
        return word


def conversation(task: str, item, tasks, items: Items, rng: random.Random, room: int, block_size: int) -> list:
    """The messages that ask about item: a user turn in one of the task's phrasings; sometimes
    after an earlier question (about a training item) and its answer, sometimes after a system
    turn, each only where the answer still has room tokens of the block."""
    messages = [{"role": "user", "content": ask(task, item, rng)}]
    if rng.random() < EARLIER_SHARE:
        earlier_task = rng.choice(tasks)
        earlier_item = items.training_item(earlier_task)
        longer = [{"role": "user", "content": ask(earlier_task, earlier_item, rng)},
                  {"role": "assistant", "content": answer_for(earlier_task, earlier_item)}] + messages
        if n_tokens(longer, True) + room <= block_size:
            messages = longer
    if rng.random() < SYSTEM_SHARE:
        longer = [{"role": "system", "content": rng.choice(SYSTEM_MESSAGES)}] + messages
        if n_tokens(longer, True) + room <= block_size:
            messages = longer
    return messages


def build_sets(seed: int, n_train: int, n_eval: int, tasks, block_size: int):
    """(training conversations, held-out questions as (task, messages, expected answer)).
    The held-out words and number pairs are drawn first and kept out of the training file."""
    rng = random.Random(seed)
    per_task = [n_eval // len(tasks) + (i < n_eval % len(tasks)) for i in range(len(tasks))]
    items = Items(rng, sum(n for t, n in zip(tasks, per_task) if t in WORD_TASKS),
                  sum(n for t, n in zip(tasks, per_task) if t == "add"))
    held_out, words, pairs = [], iter(items.held_words), iter(items.held_pairs)
    for task, n in zip(tasks, per_task):
        for _ in range(n):
            item = next(pairs) if task == "add" else next(words)
            expected = answer_for(task, item)
            held_out.append((task, conversation(task, item, tasks, items, rng, ANSWER_ROOM, block_size), expected))
    training = []
    for i in range(n_train):
        task = tasks[i % len(tasks)]
        item = items.training_item(task)
        answer = answer_for(task, item)
        # A training conversation fits the window: the answer and its end of turn after the prompt.
        messages = conversation(task, item, tasks, items, rng, len(answer) + 2, block_size)
        training.append(messages + [{"role": "assistant", "content": answer}])
    return training, held_out


def questions_of(n_turns: int, item_for, tasks, rng: random.Random) -> list:
    """n_turns questions as [(task, question, expected answer)], item_for(task) giving each one's item."""
    asked = []
    for _ in range(n_turns):
        task = rng.choice(tasks)
        item = item_for(task)
        asked.append((task, ask(task, item, rng), answer_for(task, item)))
    return asked


def as_messages(asked: list) -> list:
    """Questions and their expected answers as a conversation's messages."""
    return [message for _, question, answer in asked
            for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})]


def build_turn_sets(seed: int, n_train: int, n_conversations: int, turns: int, tasks):
    """--turns: (training conversations of 1 to `turns` questions, as many of each count;
    held-out conversations of exactly `turns` questions, each a questions_of list). The held-out
    words are drawn first and kept out of training, as in build_sets; a held-out conversation is
    drawn again until it fits LLAMA_DEFAULT_CONTEXT with ANSWER_ROOM to spare."""
    rng = random.Random(seed)
    word_tasks = [t for t in tasks if t in WORD_TASKS]
    if not word_tasks:
        raise SystemExit("--turns asks about words: give --tasks with spell or reverse")
    items = Items(rng, 4 * n_conversations * turns, 0)   # spare words for conversations drawn again
    unused_words = iter(items.held_words)
    held_out = []
    while len(held_out) < n_conversations:
        asked = questions_of(turns, lambda task: next(unused_words), word_tasks, rng)
        if n_tokens(as_messages(asked)[:-1], True) + ANSWER_ROOM <= LLAMA_DEFAULT_CONTEXT:
            held_out.append(asked)
    training = []
    for i in range(n_train):
        messages = as_messages(questions_of(1 + i % turns, items.training_item, tasks, rng))
        if rng.random() < SYSTEM_SHARE:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_MESSAGES)}] + messages
        training.append(messages)
    return training, held_out


def write_jsonl(path: str, conversations: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------ the stages

def run_stages(folder: str, args) -> float:
    """llm_model.py, train_llm.py and convert_to_gguf.py in folder; training's wall time in seconds."""
    shape = ["--n_embd", args.n_embd, "--n_head", args.n_head, "--n_layer", args.n_layer,
             "--block_size", args.block_size, "--dropout", args.dropout,
             *(["--architecture", args.architecture] if args.architecture else [])]
    stages = [("llm_model.py", ["-y", *shape]),
              ("train_llm.py", ["-y", "--dataset_path", "train.jsonl", "--minutes", args.minutes,
                                *shlex.split(args.train_flags)]),
              ("convert_to_gguf.py", [])]
    train_seconds = 0.0
    for script, flags in stages:
        command = [sys.executable, os.path.join(REPO, script), *map(str, flags)]
        print(f"$ python {script} {' '.join(map(str, flags))}", flush=True)
        started = time.time()
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if script == "train_llm.py":
            train_seconds = time.time() - started
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            raise SystemExit(f"{script} failed with exit status {result.returncode} (folder: {folder})")
        with open(os.path.join(folder, f"{script[:-3]}.out"), "w", encoding="utf-8") as f:
            f.write(result.stdout + result.stderr)
    return train_seconds


def training_summary(folder: str) -> dict:
    rows = []
    with open(os.path.join(folder, "training_log.jsonl"), encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    described = ""
    out = os.path.join(folder, "train_llm.out")
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            described = next((line.strip() for line in f if line.startswith("Conversations:")), "")
    return {"rows": rows, "described": described}


# ------------------------------------------------------------------------------ scoring

def answer_text(tokenizer, ids: list, answer_ends) -> str:
    """An answer's text: its ids decoded without the tokens that end it."""
    from custom_llm.tokenizer import decode
    while ids and ids[-1] in answer_ends:
        ids = ids[:-1]
    return decode(tokenizer, ids)


def score(folder: str, held_out: list, max_tokens: int) -> dict:
    """Each format's answers: {format: [(answer text, ended by end-of-turn)]}, and the prompts'
    agreement with PyTorch's formatting."""
    from custom_llm import isolated
    from custom_llm.chat_format import ChatFormat, end_ids, template_of_config
    from custom_llm.checks import greedy_answer
    from custom_llm.files import load_config, load_trained_model
    from custom_llm.tokenizer import load_tokenizer

    config = load_config(os.path.join(folder, "model_config.pth"))
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    model = load_trained_model(os.path.join(folder, "trained_model.pth"), config)
    template = template_of_config(config, tokenizer)
    chat = ChatFormat(tokenizer, template)
    end_of_turn, answer_ends = chat.end_of_turn, end_ids(tokenizer, template)
    messages = [m for _, m, _ in held_out]
    prompts = [ids.tolist() for ids, _ in chat.encode_many(messages, add_generation_prompt=True)]
    # The GGUF's context is the block: an answer gets the room the block has left, at most max_tokens.
    budgets = [max(1, min(max_tokens, config["block_size"] - len(p))) for p in prompts]

    def text_of(ids):
        return answer_text(tokenizer, ids, answer_ends), bool(ids) and ids[-1] == end_of_turn

    answers, timings, same_prompts = {}, {}, {}
    started = time.time()
    answers["PyTorch"] = [text_of(greedy_answer(model, p, n, answer_ends))
                          for p, n in zip(prompts, budgets)]
    timings["PyTorch"] = time.time() - started
    for name, file in (("F16 GGUF", "model.gguf"), ("Q4_0 GGUF", "model.gguf.Q4_0.gguf")):
        started = time.time()
        read = isolated.chat(os.path.join(folder, file), messages, budgets)
        timings[name] = time.time() - started
        answers[name] = [text_of(list(answer)) for _, answer in read]
        same_prompts[name] = sum(list(got) == p for (got, _), p in zip(read, prompts))
    return {"answers": answers, "timings": timings, "same_prompts": same_prompts, "config": config,
            "parameters": model.num_parameters(), "budgets": budgets}


def converse_in_script(folder: str, conversations: list, max_tokens: int) -> list:
    """inference_gguf.py --chat, each conversation's questions piped in, one JSON object per answer."""
    answers = []
    for asked in conversations:
        result = subprocess.run([sys.executable, os.path.join(REPO, "inference_gguf.py"), "--chat", "--json",
                                 "--temperature", "0", "--max_tokens", str(max_tokens)], cwd=folder,
                                input="".join(question + "\n" for _, question, _ in asked),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"inference_gguf.py --chat failed: {result.stderr.strip()[-600:]}")
        answers.append([json.loads(line)["text"] for line in result.stdout.splitlines() if line.strip()])
    return answers


def score_turns(folder: str, conversations: list, max_tokens: int) -> dict:
    """--turns: each reader's answers, [[text of each turn] of each conversation], its own earlier
    answers kept in the conversation; and the PyTorch prompts' lengths by turn."""
    from custom_llm import isolated
    from custom_llm.chat_format import ChatFormat, end_ids, template_of_config
    from custom_llm.checks import greedy_answer
    from custom_llm.files import load_config, load_trained_model
    from custom_llm.tokenizer import load_tokenizer

    config = load_config(os.path.join(folder, "model_config.pth"))
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    model = load_trained_model(os.path.join(folder, "trained_model.pth"), config)
    template = template_of_config(config, tokenizer)
    chat = ChatFormat(tokenizer, template)
    answer_ends = end_ids(tokenizer, template)
    answers, lengths, timings = {"PyTorch": []}, [], {}
    started = time.time()
    for asked in conversations:
        messages, said, sizes = [], [], []
        for _, question, _ in asked:
            messages.append({"role": "user", "content": question})
            prompt = chat.encode(messages, add_generation_prompt=True)[0].tolist()
            said.append(answer_text(tokenizer, greedy_answer(model, prompt, max_tokens, answer_ends), answer_ends))
            sizes.append(len(prompt))
            messages.append({"role": "assistant", "content": said[-1]})
        answers["PyTorch"].append(said)
        lengths.append(sizes)
    timings["PyTorch"] = time.time() - started
    started = time.time()
    questions = [[question for _, question, _ in asked] for asked in conversations]
    answers["create_chat_completion"], n_ctx = isolated.converse(os.path.join(folder, "model.gguf"), questions,
                                                                 max_tokens)
    timings["create_chat_completion"] = time.time() - started
    started = time.time()
    answers["inference_gguf.py --chat"] = converse_in_script(folder, conversations, max_tokens)
    timings["inference_gguf.py --chat"] = time.time() - started
    return {"answers": answers, "lengths": lengths, "timings": timings, "config": config, "n_ctx": n_ctx,
            "parameters": model.num_parameters()}


def report_turns(conversations: list, scored: dict, cpu: str) -> None:
    """Exact match by turn number. An answer a reader did not give (create_chat_completion refuses
    a conversation longer than its context, and the conversation ends there) counts as wrong."""
    config, answers = scored["config"], scored["answers"]
    turns, n = len(conversations[0]), len(conversations)

    def exact(said, i, turn):
        answer = said[i][turn] if turn < len(said[i]) else None
        return answer is not None and answer.strip() == conversations[i][turn][2]

    print(f"\n## Exact match by turn number: {n} held-out conversations of {turns} questions, greedy, "
          f"each reader's own answers kept ({config.get('architecture', 'gpt2')}, block_size "
          f"{config['block_size']}; create_chat_completion's n_ctx {scored['n_ctx']}; CPU: {cpu})\n")
    print("| turn | prompt tokens (PyTorch, mean) | " + " | ".join(answers) + " |")
    print("|---:|---:|" + "---:|" * len(answers))
    for turn in range(turns):
        mean_length = sum(sizes[turn] for sizes in scored["lengths"]) / n
        cells = [percent(sum(exact(said, i, turn) for i in range(n)), n) for said in answers.values()]
        print(f"| {turn + 1} | {mean_length:.0f} | " + " | ".join(cells) + " |")
    totals = [percent(sum(exact(said, i, t) for i in range(n) for t in range(turns)), n * turns)
              for said in answers.values()]
    print("| all | | " + " | ".join(totals) + " |")
    for name, said in answers.items():
        refused = [len(s) for s in said if s and s[-1] is None]
        if refused:
            print(f"\n{name}: {len(refused)} of {n} conversations refused by the front end at turn "
                  f"{min(refused)} to {max(refused)} (longer than its context); their later turns count as wrong")
    print("\nseconds to hold every conversation: "
          + ", ".join(f"{name} {seconds:.1f}" for name, seconds in scored["timings"].items()))
    print(f"\nThe first conversation ({cpu}):")
    for turn, (_, question, expected) in enumerate(conversations[0]):
        print(f"  {turn + 1}. {question!r} -> expected {expected!r}; "
              + "; ".join(f"{name} {said[0][turn]!r}" for name, said in answers.items() if turn < len(said[0])))


def percent(part, whole) -> str:
    return f"{100 * part / max(1, whole):.1f}"


def report(held_out: list, scored: dict, cpu: str) -> None:
    answers = scored["answers"]
    reference = answers["PyTorch"]
    n = len(held_out)
    print(f"\n## Held-out questions ({n}), greedy, answers up to {max(scored['budgets'])} tokens "
          f"(at least {min(scored['budgets'])} where the block has less room) (CPU: {cpu})\n")
    print("| format | exact match % | ended by end-of-turn % | same answer as PyTorch % | prompts formatted as "
          "PyTorch's | seconds to answer all |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, got in answers.items():
        exact = sum(text.strip() == expected for (text, _), (_, _, expected) in zip(got, held_out))
        ended = sum(e for _, e in got)
        same = sum(text == ref for (text, _), (ref, _) in zip(got, reference))
        formatted = f"{scored['same_prompts'][name]} of {n}" if name in scored["same_prompts"] else "(itself)"
        print(f"| {name} | {percent(exact, n)} | {percent(ended, n)} | {percent(same, n)} | {formatted} | "
              f"{scored['timings'][name]:.1f} |")

    tasks = [t for t in TASKS if any(task == t for task, _, _ in held_out)]
    groups = [(t, [i for i, (task, _, _) in enumerate(held_out) if task == t]) for t in tasks]
    word_rows = [i for i, (task, _, _) in enumerate(held_out) if task in WORD_TASKS]
    if len([t for t in tasks if t in WORD_TASKS]) > 1 and len(word_rows) < n:
        groups.append(("spell + reverse", word_rows))
    groups.append(("(any) after an earlier question and its answer",
                   [i for i, (_, messages, _) in enumerate(held_out) if follows_earlier(messages)]))
    groups.append(("(any) after a system message",
                   [i for i, (_, messages, _) in enumerate(held_out) if messages[0]["role"] == "system"]))
    print(f"\n## Exact match % per task (CPU: {cpu})\n")
    print("| task | questions | " + " | ".join(answers) + " |")
    print("|---|---:|" + "---:|" * len(answers))
    for label, rows in groups:
        cells = [percent(sum(got[i][0].strip() == held_out[i][2] for i in rows), len(rows)) for got in answers.values()]
        print(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")

    print(f"\nSome answers ({cpu}):")
    shown = set()
    for i, (task, messages, expected) in enumerate(held_out):
        kind = (task, follows_earlier(messages))
        if kind in shown:
            continue
        shown.add(kind)
        asked = " / ".join(f"{m['role']}: {m['content']}" for m in messages)
        print(f"  {asked!r} -> expected {expected!r}; "
              + "; ".join(f"{name} {got[i][0]!r}" for name, got in answers.items()))
    wrong = [i for i, (_, _, expected) in enumerate(held_out) if reference[i][0].strip() != expected]
    for i in wrong[:6]:
        print(f"  wrong in PyTorch: {held_out[i][1][-1]['content']!r} -> {reference[i][0]!r} "
              f"(expected {held_out[i][2]!r})")


# ------------------------------------------------------------------------------ main

def describe_training(folder: str, scored: dict, train_seconds, cpu: str) -> None:
    summary = training_summary(folder)
    config = scored["config"]
    rows = summary["rows"]
    last = rows[-1] if rows else {}
    val = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
    print(f"\n## Training (CPU: {cpu})\n")
    print(f"model: {scored['parameters'] / 1e6:.2f}M parameters, {config.get('architecture', 'gpt2')}, n_layer "
          f"{config['n_layer']}, n_head {config['n_head']}, n_embd {config['n_embd']}, block_size "
          f"{config['block_size']}, vocab_size {config['vocab_size']}")
    if summary["described"]:
        print(summary["described"])
    print(f"steps: {last.get('step', '?')} in {last.get('elapsed_s', 0) / 60:.2f} min of training, "
          f"{last.get('tokens_per_s', 0):,} tokens/s"
          + (f" (train_llm.py's wall time, reading the data too: {train_seconds / 60:.2f} min)"
             if train_seconds else "")
          + (f"; final validation loss {val[-1]:.4f} per answer token (best {min(val):.4f})" if val else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4, help="training time (train_llm.py --minutes)")
    parser.add_argument("--n_eval", type=int, default=200, help="held-out questions, shared among the tasks")
    parser.add_argument("--n_train", type=int, default=100000, help="training conversations")
    parser.add_argument("--tasks", default=",".join(WORD_TASKS),
                        help=f"comma-separated, of {', '.join(TASKS)} (default: the word tasks)")
    parser.add_argument("--max_tokens", type=int, default=48, help="the longest answer, in tokens")
    parser.add_argument("--seed", type=int, default=1, help="the data set's seed")
    # llm_model.py's shape: the small one (0.88M parameters), which makes the most steps in a few
    # minutes on 2 cores; a block of 128 characters holds a question after a system message or an
    # earlier exchange.
    parser.add_argument("--n_embd", type=int, default=128, help="llm_model.py --n_embd")
    parser.add_argument("--n_head", type=int, default=4, help="llm_model.py --n_head")
    parser.add_argument("--n_layer", type=int, default=4, help="llm_model.py --n_layer")
    parser.add_argument("--block_size", type=int, default=128, help="llm_model.py --block_size")
    parser.add_argument("--dropout", type=float, default=0, help="llm_model.py --dropout")
    parser.add_argument("--architecture", choices=["windowed", "gpt2"], default=None,
                        help="llm_model.py --architecture (default: llm_model.py's)")
    parser.add_argument("--turns", type=int, default=1,
                        help="questions per conversation: above 1, training conversations hold 1 to TURNS and "
                             "the held-out ones TURNS, scored by turn number")
    parser.add_argument("--conversations", type=int, default=40,
                        help="held-out conversations with --turns (each of TURNS questions)")
    parser.add_argument("--write_data", metavar="PATH",
                        help="only write the training conversations to PATH (.jsonl), to try the chat stages by hand")
    parser.add_argument("--train_flags", default="", help="more train_llm.py flags, e.g. '--batch_size 64'")
    parser.add_argument("--keep", action="store_true", help="keep the folder it ran in")
    parser.add_argument("--workdir", help="score a folder where this benchmark ran (with --keep) again, "
                                          "without training")
    args = parser.parse_args()
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        parser.error(f"--tasks: {', '.join(unknown) or 'none given'}; choose from {', '.join(TASKS)}")
    if args.turns < 1:
        parser.error(f"--turns {args.turns}: give 1 or more")

    if args.turns > 1:
        training, held_out = build_turn_sets(args.seed, args.n_train, args.conversations, args.turns, tasks)
    else:
        training, held_out = build_sets(args.seed, args.n_train, args.n_eval, tasks, args.block_size)
    if args.write_data:
        write_jsonl(args.write_data, training)
        print(f"wrote {len(training):,} conversations to {args.write_data}")
        return
    cpu = cpu_summary()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"CPU: {cpu}\ndate: {datetime.date.today()}; commit {commit}")
    print(f"command: python benchmarks/bench_chat.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    folder = args.workdir or tempfile.mkdtemp(prefix="bench-chat-")
    if args.turns > 1:
        lengths = [n_tokens(as_messages(asked)) for asked in held_out]
        data = (f"{len(training):,} training conversations of 1 to {args.turns} questions (seed {args.seed}); "
                f"{len(held_out)} held-out conversations of {args.turns} questions on words not in them, "
                f"{min(lengths)} to {max(lengths)} tokens with the expected answers")
        scoring, reporting = score_turns, report_turns
    else:
        about = " and ".join(kind for kind, asked in (("words", set(tasks) & set(WORD_TASKS)),
                                                       ("number pairs", "add" in tasks)) if asked)
        data = (f"{len(training):,} training conversations of tasks {', '.join(tasks)} (seed {args.seed}); "
                f"{len(held_out)} held-out questions on {about} not in them, "
                f"{sum(follows_earlier(m) for _, m, _ in held_out)} of them after an earlier question and its "
                f"answer, {sum(m[0]['role'] == 'system' for _, m, _ in held_out)} after a system message")
        scoring, reporting = score, report
    print(f"folder: {folder}\ndata: {data}\n")
    train_seconds = None
    if not args.workdir:
        write_jsonl(os.path.join(folder, "train.jsonl"), training)
        train_seconds = run_stages(folder, args)

    scored = scoring(folder, held_out, args.max_tokens)
    describe_training(folder, scored, train_seconds, cpu)
    reporting(held_out, scored, cpu)
    if not args.keep and not args.workdir:
        subprocess.run(["rm", "-rf", folder])


if __name__ == "__main__":
    main()
