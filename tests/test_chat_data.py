"""Conversations as people have them: .jsonl, .json and .parquet files; the messages, ShareGPT,
Alpaca and prompt/completion layouts; the reasons given when too few conversations are usable; a
bad line in a folder's file; and conversations that hold a marker of the chat format."""

import json
import random

import pytest
from conftest import one_line_error, run_script
from test_chat import CHAT_TINY, QUICK, assert_the_chat_check_passes, made_up_word, write_jsonl

from custom_llm.chat_format import SPECIAL_TOKENS, ChatFormat, with_chat_tokens
from custom_llm.chat_layouts import conversation
from custom_llm.checks import chat_prompts
from custom_llm.chat_data import read_conversations, split_held_out
from custom_llm.corpus import find_documents
from custom_llm.errors import UserError
from custom_llm.tokenizer import build_char_tokenizer


def write(path, records):
    """records in the file kind that path's suffix names."""
    if path.suffix == ".jsonl":
        write_jsonl(path, records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        import pyarrow
        import pyarrow.parquet
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), str(path))
    return path


def turn(question, answer, system=None):
    """The messages the reader should give for one exchange."""
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# Each layout (and its variants) as records, with the messages each should become. A file holds one layout
# (a Parquet column has one type); within a file, a missing key is a null column in Parquet.
LAYOUT_CASES = {
    "messages": ([{"messages": turn("Spell vodi", "v-o-d-i")},
                  {"messages": [{"role": "User", "content": "Reverse tasu"}, {"role": "ASSISTANT", "content": "usat"}]},
                  {"prompt": "Spell gemo", "prompt_id": "7", "messages": turn("Spell gemo", "g-e-m-o")}],
                 [turn("Spell vodi", "v-o-d-i"), turn("Reverse tasu", "usat"), turn("Spell gemo", "g-e-m-o")]),
    "parts": ([{"messages": [{"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
                             {"role": "user", "content": [{"type": "text", "text": "Reverse "},
                                                          {"type": "text", "text": "pilo"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "olip"}]}]}],
              [turn("Reverse pilo", "olip", system="Be terse.")]),
    "sharegpt": ([{"conversations": [{"from": "human", "value": "Spell rafu"}, {"from": "gpt", "value": "r-a-f-u"}]},
                  {"conversations": [{"from": "system", "value": "Be terse."},
                                     {"from": "User", "value": "Reverse kime"}, {"from": "Assistant", "value": "emik"},
                                     {"from": "human", "value": "thanks"}]}],
                 [turn("Spell rafu", "r-a-f-u"), turn("Reverse kime", "emik", system="Be terse.")]),
    "alpaca": ([{"instruction": "Spell the word", "input": "lunabo", "output": "l-u-n-a-b-o"},
                {"instruction": "Reverse zefo", "input": "", "output": "ofez"},
                {"instruction": "Reverse mido", "output": "odim"}],
               [turn("Spell the word\n\nlunabo", "l-u-n-a-b-o"), turn("Reverse zefo", "ofez"),
                turn("Reverse mido", "odim")]),
    "shorthand": ([{"prompt": "Spell hapi", "completion": "h-a-p-i"}],
                  [turn("Spell hapi", "h-a-p-i")]),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_layout_reads_as_the_same_messages_in_every_file_kind(tmp_path, suffix):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, (records, _) in LAYOUT_CASES.items():
        write(folder / f"{name}{suffix}", records)
    conversations, notes, skipped = read_conversations(find_documents(str(folder)))
    expected = [messages for _, (_, wanted) in sorted(LAYOUT_CASES.items()) for messages in wanted]   # files by name
    assert conversations == expected
    assert notes == [] and not skipped
    alone, _, _ = read_conversations(find_documents(str(folder / f"sharegpt{suffix}")))   # a file given alone
    assert alone == LAYOUT_CASES["sharegpt"][1]


def test_near_misses_and_what_is_not_a_conversation_get_their_reason():
    cases = [({"instruction": "Spell it", "response": "i-t"}, "in no known layout", '"instruction", "response"'),
             ({"messages": [{"role": "bot", "content": "x"}]}, "with an unknown role", 'role "bot"'),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                            {"role": "assistant", "content": "y"}]}, "with a content that is not text", "part"),
             ({"conversations": [{"from": "human", "value": "only a question"}]}, "with no assistant turn", ""),
             ({"conversations": []}, "with no messages", "empty list"),
             ({"instruction": "Spell it", "input": 3, "output": "i-t"}, "with a content that is not text", "input"),
             (["a", "list"], "not an object", "")]
    for record, kind, detail in cases:
        reason = conversation(record)
        assert reason.kind == kind and detail in reason.detail, (record, reason)


# ------------------------------------------------------------------ .json

def test_a_json_array_of_conversations_trains_as_conversations(tmp_path):
    rng = random.Random(1)
    words = [made_up_word(rng) for _ in range(60)]
    write(tmp_path / "talks.json", [{"instruction": f"Reverse {w}", "input": "", "output": w[::-1]} for w in words])
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    result = run_script("train_llm.py", "--dataset_path", "talks.json", "--max_steps", 2, *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Conversations: {len(words)} -> " in result.stdout
    assert "Text:" not in result.stdout


def test_a_json_file_that_is_not_conversations_is_one_line_and_never_text(tmp_path):
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    files = {"settings.json": ('{"learning": "fast", "colour": "teal"}',
                               "holds an object with the keys learning, colour"),
             "words.json": ('["bado", "kimu", "tesa"]', "holds an array whose first item is a string"),
             "broken.json": ('[{"prompt": "a", "completion": "b"},\n {"prompt": "c"', "is not valid JSON (line 2"),
             "number.json": ("42", "holds a number")}
    for name, (content, said) in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        line = one_line_error(run_script("train_llm.py", "--dataset_path", name, *QUICK, cwd=tmp_path), 2)
        assert f"{name} {said}" in line, line
        assert "not an array of conversations" in line or "not valid JSON" in line
        assert "rename it to .txt" in line, line
        assert not (tmp_path / "trained_model.pth").exists() and not (tmp_path / "tokenizer.json").exists()


def test_json_lines_under_a_json_name_are_read_line_by_line(tmp_path):
    path = tmp_path / "export.json"   # as some tools name JSON Lines
    write_jsonl(path, [{"prompt": "Spell sumo", "completion": "s-u-m-o"},
                       {"prompt": "Spell ravi", "completion": "r-a-v-i"}], ["{not json"])
    conversations, notes, skipped = read_conversations(find_documents(str(path)))
    assert conversations == [turn("Spell sumo", "s-u-m-o"), turn("Spell ravi", "r-a-v-i")]
    assert notes == [f"note: skipped {path}:3: not JSON (Expecting property name enclosed in double quotes)"]
    assert skipped == {"not JSON": 1}


def test_items_of_a_json_array_are_named_by_their_number(tmp_path):
    path = tmp_path / "talks.json"
    records = [{"prompt": "Spell sumo", "completion": "s-u-m-o"}, {"prompt": "Spell ravi"},
               {"prompt": "Spell kelo", "completion": "k-e-l-o"}]
    path.write_text("\ufeff" + json.dumps(records), encoding="utf-8")   # with a byte-order mark, on one line
    conversations, notes, _ = read_conversations(find_documents(str(path)))
    assert conversations == [turn("Spell sumo", "s-u-m-o"), turn("Spell kelo", "k-e-l-o")]
    assert len(notes) == 1
    assert notes[0].startswith(f'note: skipped {path} item 2: no known layout: its keys are "prompt";'), notes


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_conversations(find_documents(str(path)))
    message = str(caught.value)
    assert message.startswith(f"{path} cannot be read as Parquet (") and "\n" not in message


# ------------------------------------------------------------------ too few usable

def test_too_few_usable_conversations_says_why_for_the_first_lines_and_counts_each_reason(tmp_path):
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    records = [{"messages": [{"role": "bot", "content": f"say {i}"}, {"role": "assistant", "content": "ok"}]}
               for i in range(27)]
    write_jsonl(tmp_path / "near.jsonl", records[:2], ["{oops", '{"instruction": "x", "response": "y"}'] +
                [json.dumps(r) for r in records[2:]] + ["[1]"])
    line = one_line_error(run_script("train_llm.py", "--dataset_path", "near.jsonl", *QUICK, cwd=tmp_path), 2)
    assert line.startswith("error: near.jsonl holds 0 usable conversations, 30 skipped: 27 with an unknown role "
                           '(first near.jsonl:1: message 1 has role "bot", not one of system, user, assistant), '
                           "1 not JSON (first near.jsonl:3: not JSON"), line
    assert '1 in no known layout (first near.jsonl:4: no known layout: its keys are "instruction", "response"; ' \
           'expected "messages", "conversations", "instruction" and "output", or "prompt" and "completion")' in line
    assert line.endswith(", 1 not an object; training needs at least 2, one each to train and to validate on: "
                         "docs/chat.md shows the layouts read")   # the first three reasons met have their line


# ------------------------------------------------------------------ a bad line in a folder's file

def test_a_bad_byte_in_a_folder_file_loses_only_its_line(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": f"Spell {w}", "completion": "-".join(w)} for w in ("kobi", "lute")])
    b = write_jsonl(folder / "b.jsonl", [{"prompt": f"Reverse {w}", "completion": w[::-1]} for w in ("dasi", "ferno")])
    with open(b, "ab") as f:
        f.write(b'{"prompt": "Reverse caf\xe9", "completion": "x"}\n')   # Latin-1, not UTF-8
    with open(b, "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "Reverse mola", "completion": "alom"}) + "\n")
    c = folder / "c.json"
    c.write_bytes(b'[{"instruction": "Spell pevo", "output": "p-e-v-o"},\n'
                  b' {"instruction": "Spell n\xf6ra", "output": "n-o-r-a"}]')
    for spec, n, bad in ((str(folder), 6, [(b, ":3"), (c, " item 2")]), (str(b), 3, [(b, ":3")]),
                         (str(c), 1, [(c, " item 2")])):
        corpus = find_documents(spec)
        assert not corpus.skipped and corpus.notes() == []
        if n < 2:
            with pytest.raises(UserError, match="holds 1 usable conversation, 1 skipped: 1 not utf-8 text"):
                read_conversations(corpus)
            continue
        conversations, notes, skipped = read_conversations(corpus)
        assert len(conversations) == n and turn("Reverse mola", "alom") in conversations
        assert notes == [f"note: skipped {path}{where}: message 1's content is not utf-8 text" for path, where in bad]
        assert skipped == {"not utf-8 text": len(bad)}


# ------------------------------------------------------------------ chat markers in the text

def marked_conversations(n=300, seed=2):
    """Spelling exchanges; three in four have a marker of the chat format typed in their question
    (<|endoftext|>, <|im_start|>, <|im_end|> in turn), so that any three held out would hold one."""
    rng, records = random.Random(seed), []
    for i in range(n):
        word = made_up_word(rng)
        question = f"Spell {word}" + (f" {SPECIAL_TOKENS[i % 4 - 1]} now" if i % 4 else "")
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": "-".join(word)}]})
    return records


def test_conversations_holding_a_marker_are_skipped_with_a_note_and_never_held_out(tmp_path):
    path = write_jsonl(tmp_path / "marked.jsonl", marked_conversations())
    corpus = find_documents(str(path))
    conversations, notes, skipped = read_conversations(corpus)
    assert len(conversations) == 75 and skipped == {"holding a chat marker": 225}
    assert notes[:3] == [f"note: skipped {path}:{line}: message 1 holds {marker}, a marker of the chat format, "
                         "which front ends read as a special token"
                         for line, marker in zip((2, 3, 4), ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))]
    text = json.dumps(conversations)
    assert not any(token in text for token in SPECIAL_TOKENS)
    held_out = split_held_out(read_conversations(corpus)[0])[1]
    assert held_out and not any(token in json.dumps(held_out) for token in SPECIAL_TOKENS)
    tokenizer = with_chat_tokens(build_char_tokenizer("abcdefghijklmnopqrstuvwxyz -S"))
    prompts = chat_prompts(held_out, tokenizer, {"block_size": 64})
    specials = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    for messages, ids in prompts:   # the prompt's only special tokens are the template's: two per message, one more
        assert sum(i in specials for i in ids) == 2 * len(messages) + 1
        assert ids == ChatFormat(tokenizer).encode(messages, add_generation_prompt=True)[0].tolist()


def test_marked_data_in_several_kinds_and_layouts_trains_and_passes_the_export_check(tmp_path):
    """End to end: a folder of the three kinds and three layouts, three in four of its conversations
    holding markers, one bad byte: training counts what it skipped, and the export check passes."""
    folder = tmp_path / "data"
    folder.mkdir()
    marked = marked_conversations()
    write_jsonl(folder / "a.jsonl", marked[:120])
    with open(folder / "a.jsonl", "ab") as f:
        f.write(b'{"prompt": "Spell d\xfcno", "completion": "d-u-n-o"}\n')
    sharegpt = [{"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                   for m in r["messages"]]} for r in marked[120:200]]
    write(folder / "b.json", sharegpt)
    alpaca = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
              for r in marked[200:]]
    write(folder / "c.parquet", alpaca)
    assert run_script("llm_model.py", *CHAT_TINY, "-y", cwd=tmp_path).returncode == 0
    result = run_script("train_llm.py", "--dataset_path", "data", "--max_steps", 30, *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Conversations: 3 files, 75 (226 skipped: 225 holding a chat marker, 1 not utf-8 text) -> " in result.stdout
    assert "note: skipped data/a.jsonl:3: message 1 holds <|im_start|>" in result.stdout
    assert_the_chat_check_passes(tmp_path)
