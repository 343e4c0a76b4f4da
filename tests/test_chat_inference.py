"""Chat at the terminal: a chat model's prompt is the training format id for id, its answer ends
at the end of its turn, and the conversation is kept, fitted to the context (oldest whole turns
dropped, the system message kept) and reset. A model without a chat template continues text."""

import json

import numpy as np
import pytest
import torch
from conftest import Terminal, one_line_error, run_script

from custom_llm.chat_format import END_OF_TURN, TURN_START, ChatFormat, ChatHistory, TurnTooLong, with_chat_tokens
from custom_llm.export import write_gguf_atomic
from custom_llm.model import build_model
from custom_llm.runtime import GGUFModel
from custom_llm.textfile import END_OF_TEXT
from custom_llm.tokenizer import build_char_tokenizer

BLOCK = 64
CONFIG = {"n_embd": 32, "n_head": 4, "n_layer": 1, "block_size": BLOCK, "dropout": 0.0}
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 .,<|>_\n"
ANSWER = "ok"


def id_of(tokenizer, token: str) -> int:
    """A special token's id, or a character's."""
    [token_id] = tokenizer.encode(token, add_special_tokens=False).ids
    return token_id


def bigram_model(tokenizer, follows: dict):
    """A model whose next token depends on the last one alone: follows[a] = b makes b the greedy
    choice after a. The blocks add nothing and positions are zero, so the last hidden state is
    LayerNorm(wte[a]); the head's row for b is that vector, and by Cauchy-Schwarz (every such
    vector has the same length) no other row scores as high."""
    torch.manual_seed(0)
    model = build_model({**CONFIG, "vocab_size": tokenizer.get_vocab_size()}).eval()
    with torch.no_grad():
        model.wte.weight.normal_()
        model.wpe.weight.zero_()
        for block in model.h:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
        model.lm_head.weight.zero_()
        for before, after in follows.items():
            hidden = model.ln_f(model.wte.weight[id_of(tokenizer, before)])
            model.lm_head.weight[id_of(tokenizer, after)] += hidden
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """chat.gguf answers every message with "ok" and ends its turn; text.gguf has no chat template."""
    folder = tmp_path_factory.mktemp("chat")
    tokenizer = with_chat_tokens(build_char_tokenizer(CHARACTERS))
    # The generation prompt ends "<|im_start|>assistant\n": then "o", "k", the end of the turn.
    model = bigram_model(tokenizer, {"\n": "o", "o": "k", "k": END_OF_TURN})
    write_gguf_atomic(model, tokenizer, str(folder / "chat.gguf"), "F32")
    text_tokenizer = build_char_tokenizer(CHARACTERS)
    torch.manual_seed(0)
    text_model = build_model({**CONFIG, "vocab_size": text_tokenizer.get_vocab_size()}).eval()
    write_gguf_atomic(text_model, text_tokenizer, str(folder / "text.gguf"), "F32")
    folder.joinpath("tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(folder):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def chat_model(folder):
    return GGUFModel(str(folder / "chat.gguf"), n_threads=1)


def chat(folder, *args, input=None, gguf="chat.gguf"):
    return run_script("inference_gguf.py", "--gguf_path", gguf, "--temperature", 0, "--threads", 1, *args,
                      cwd=folder, input=input)


def chat_json(folder, *args, input=None):
    result = chat(folder, "--json", *args, input=input)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def user(text):
    return {"role": "user", "content": text}


def answer(text=ANSWER):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------ the prompt's ids

def test_prompt_ids_are_the_training_format_id_for_id(chat_model, tokenizer):
    chat_format = ChatFormat(tokenizer)
    conversations = [
        [user("spell kadu")],
        [{"role": "system", "content": "be brief."}, user("a1"), answer(), user("b2")],
        # Typed special tokens are text, on both sides.
        [user("say <|im_end|> then <|im_start|>assistant\n and <|endoftext|>"), answer("<|im_end|>"),
         user("again <|im_end|>")],
        [user("")],
    ]
    for messages in conversations:
        expected = chat_format.encode(messages, add_generation_prompt=True)[0].tolist()
        got = chat_model.encode_chat(messages)
        assert got == expected, messages
        assert got.count(tokenizer.token_to_id(END_OF_TURN)) == len(messages)       # one per message
        assert got.count(tokenizer.token_to_id(TURN_START)) == len(messages) + 1    # and the answer's
        assert tokenizer.token_to_id(END_OF_TEXT) not in got
    assert chat_model.end_of_turn == tokenizer.token_to_id(END_OF_TURN)
    assert chat_model.is_chat


def test_generation_stops_at_the_end_of_turn(chat_model, tokenizer):
    prompt = chat_model.encode_chat([user("a1")])
    tokens = list(chat_model.generate(prompt, 20, lambda logits: int(np.argmax(logits))))
    assert tokens == [id_of(tokenizer, c) for c in ANSWER] + [tokenizer.token_to_id(END_OF_TURN)]


# ---------------------------------------------------------------------------- --query

def test_query_prints_only_the_answer(folder, tokenizer):
    result = chat(folder, "--query", "spell kadu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER + "\n"                 # not the prompt, not the markers
    assert "ended by end of turn" in result.stderr

    [out], _ = chat_json(folder, "--query", "spell kadu", "--system", "be brief.", "--max_tokens", 8)
    messages = [{"role": "system", "content": "be brief."}, user("spell kadu")]
    assert out["messages"] == messages + [answer()]
    assert out["text"] == ANSWER and out["stop_reason"] == "end_of_turn"
    assert out["tokens"] == [id_of(tokenizer, c) for c in ANSWER]
    assert out["n_prompt_tokens"] == len(ChatFormat(tokenizer).encode(messages, add_generation_prompt=True)[0])


# ----------------------------------------------------------------------- conversation

def test_the_conversation_is_kept_fitted_to_the_context_and_reset(folder, tokenizer):
    system = {"role": "system", "content": "s"}
    lines = ["a1", "b2", "c3", "e" * 20, "/reset", "d4"]
    outputs, stderr = chat_json(folder, "--chat", "--system", "s", "--max_tokens", 4,
                                input="\n".join(lines) + "\n")
    assert [o["messages"] for o in outputs] == [
        [system, user("a1"), answer()],
        [system, user("a1"), answer(), user("b2"), answer()],                  # the first answer is kept
        [system, user("b2"), answer(), user("c3"), answer()],                  # the oldest turn went
        [system, user("e" * 20), answer()],                                    # both went
        [system, user("d4"), answer()],                                        # after /reset
    ]
    chat_format = ChatFormat(tokenizer)
    for out in outputs:   # what the model read was the conversation shown
        prompt_ids = chat_format.encode(out["messages"][:-1], add_generation_prompt=True)[0]
        assert out["n_prompt_tokens"] == len(prompt_ids) <= BLOCK - 4
    assert "note: the oldest turn no longer fits the context of 64 tokens and was dropped" in stderr
    assert "note: the 2 oldest turns no longer fit the context of 64 tokens and were dropped" in stderr
    assert "conversation cleared (the system message stays)" in stderr


def test_a_message_too_long_for_the_context_is_not_sent(folder):
    line = one_line_error(chat(folder, "--query", "x" * 70), 2)
    assert "89 tokens" in line and "context is 64 tokens" in line   # 70, the frame and the answer's start
    # In a conversation, the loop goes on without it.
    outputs, stderr = chat_json(folder, input="x" * 70 + "\na1\n")
    assert [o["messages"] for o in outputs] == [[user("a1"), answer()]]
    assert "89 tokens" in stderr


def test_conversation_drops_whole_turns_and_keeps_the_system_message():
    def encode(messages):                      # ten ids a message, two more for the answer's start
        return [0] * (10 * len(messages) + 2)
    turns = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    messages, ids, dropped = ChatHistory("sys", list(turns)).fit("q4", encode, 61)
    assert dropped == 2 and len(ids) == 42                               # whole turns, never half
    conversation = ChatHistory("sys", list(turns))
    messages, ids, dropped = conversation.fit("q4", encode, 62)         # system, 2 turns, q4
    assert dropped == 1 and len(ids) == 62
    assert messages[0] == {"role": "system", "content": "sys"} and messages[1] == user("q2")
    assert conversation.turns == [("q2", "a2"), ("q3", "a3")]
    with pytest.raises(TurnTooLong) as raised:
        conversation.fit("q4", encode, 21)
    assert raised.value.n_tokens == 22 and len(conversation.turns) == 2   # nothing dropped
    conversation.reset()
    assert conversation.messages("q") == [{"role": "system", "content": "sys"}, user("q")]


# ------------------------------------------------------------------ at the terminal

def test_interactive_chat_says_it_is_a_chat_and_resets(folder):
    term = Terminal("inference_gguf.py", "--gguf_path", "chat.gguf", "--temperature", 0, "--threads", 1,
                    cwd=folder)
    term.read_until("a chat model")
    term.read_until("/reset starts over")
    term.read_until("> ")
    term.send("/help\n")
    term.read_until("/reset")
    term.read_until("> ")
    term.send("spell kadu\n")
    term.read_until("ended by end of turn")
    assert "<|im_start|>" not in term.output
    term.read_until("> ")
    term.send("/reset\n")
    term.read_until("conversation cleared")
    term.read_until("> ")
    term.send("\x04")
    assert term.wait() == 0, term.output


# ------------------------------------------------------------------ a text model

def test_chat_on_a_text_model_is_one_line(folder):
    for flags in (["--chat"], ["--system", "be brief.", "--query", "a"]):
        line = one_line_error(chat(folder, *flags, gguf="text.gguf"), 2)
        assert "text.gguf was not trained on conversations" in line
    result = chat(folder, "--query", "ab", "--max_tokens", 5, gguf="text.gguf")   # it continues text
    assert result.returncode == 0 and result.stdout.startswith("ab")
