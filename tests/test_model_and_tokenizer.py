"""The model's graph and context rule, and the tokenizer (Python side and llama.cpp side)."""

import math

import numpy as np
import pytest
import torch
from conftest import make_text
from hypothesis import given, settings
from hypothesis import strategies as st

from custom_llm.checks import HARD_STRINGS
from custom_llm.encoder import char_lookup_table
from custom_llm.export import write_gguf_atomic
from custom_llm.sampling import Sampler, Settings
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import BYTE_SYMBOLS, END_OF_TEXT, build_char_tokenizer, decode, encode, train_bpe_tokenizer
from custom_llm.context import fit_prompt, slide
from custom_llm.model import build_model, KVCache, count_parameters

CONFIG = {"vocab_size": 300, "n_embd": 32, "n_head": 4, "n_layer": 2, "block_size": 16, "dropout": 0.0}


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    idx = torch.randint(0, 300, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 300)
    assert abs(loss.item() - math.log(300)) < 0.2  # near-uniform at initialisation
    assert model(idx)[1] is None
    assert model.num_parameters() == count_parameters(CONFIG)
    with pytest.raises(ValueError):
        model(torch.zeros((1, 17), dtype=torch.long))  # never more than block_size tokens


def test_graph_is_gpt2():
    model = build_model(CONFIG)
    assert model.lm_head.bias is None  # llama.cpp's gpt2 output matrix has no bias
    assert all(block.ln_1.bias is not None and block.attn.c_attn.out_features == 3 * 32 for block in model.h)
    x = torch.linspace(-4, 4, 101)
    gelu_tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert torch.allclose(torch.nn.functional.gelu(x, approximate="tanh"), gelu_tanh, atol=1e-6)


def test_context_rule():
    assert fit_prompt(list(range(40)), 16) == list(range(24, 40))
    window = list(range(16))
    assert slide(window, 16) == window                 # full but not over: unchanged
    assert slide(window + [99], 16) == list(range(9, 16)) + [99]  # over: keep the newest half
    assert slide([1, 2], 1) == [2]


def test_generate_runs_far_past_the_context():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    prompt = torch.randint(0, 300, (2, 40))  # longer than block_size too
    out = model.generate(prompt, 100, temperature=0)
    assert out.shape == (2, 140) and torch.equal(out[:, :40], prompt)
    sampled = model.generate(prompt[:, :3], 20, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 23) and int(sampled.max()) < 300


def test_one_forward_pass_with_or_without_a_kv_cache():
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        whole = model(idx)[0]
        cache = KVCache()   # the same positions fed in pieces: a window, one token, several tokens
        pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 9), (9, 10), (10, 16))]
    assert len(cache) == 16
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5)
    with pytest.raises(ValueError):
        model(idx[:, :1], kv_cache=cache)   # position 16 is past block_size


def test_generate_samples_with_the_inference_sampler():
    """PyTorch generate() draws what sampling.Sampler (inference_gguf.py's sampler) draws from
    the model's logits, and every sampling control works there."""
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    prompt = torch.randint(0, 300, (1, 5))
    n = 40                                   # past block_size: the window slides
    greedy = model.generate(prompt, n, temperature=0)
    for narrow in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        assert torch.equal(model.generate(prompt, n, temperature=2.0, seed=1, **narrow), greedy), narrow
    controls = {"temperature": 1.3, "top_k": 50, "top_p": 0.9, "min_p": 0.01, "repeat_penalty": 1.3,
                "repeat_last_n": 8, "seed": 7}
    sampled = model.generate(prompt, n, **controls)
    assert torch.equal(model.generate(prompt, n, **controls), sampled)          # same seed, same text
    assert not torch.equal(model.generate(prompt, n, **{**controls, "seed": 8}), sampled)
    sampler = Sampler(Settings(**controls))
    tokens = prompt[0].tolist()
    sampler.start(tokens)
    window = fit_prompt(tokens, CONFIG["block_size"])
    with torch.no_grad():
        for _ in range(n):   # the context rule by hand, re-reading the window for every token
            token = sampler(model(torch.tensor([window]))[0][0, -1].numpy())
            tokens.append(token)
            window = slide(window + [token], CONFIG["block_size"])
    assert sampled[0].tolist() == tokens
    torch.manual_seed(3)   # without a seed, torch's generator decides, as before
    first = model.generate(prompt, n, temperature=1.0)
    torch.manual_seed(3)
    assert torch.equal(model.generate(prompt, n, temperature=1.0), first)


# ------------------------------------------------------------------------- tokenizer

TRAINING_TEXT = make_text(200)


def test_one_token_per_distinct_character():
    tokenizer = build_char_tokenizer(sorted(set(TRAINING_TEXT)))
    ids = encode(tokenizer, TRAINING_TEXT)
    assert len(ids) == len(TRAINING_TEXT)  # 🙂, 日, ï each one token
    assert len(set(ids)) == len(set(TRAINING_TEXT))
    assert decode(tokenizer, ids) == TRAINING_TEXT
    table = char_lookup_table(tokenizer)
    assert np.array_equal(table[[ord(c) for c in TRAINING_TEXT]], ids)


def test_unseen_characters_fall_back_to_bytes():
    tokenizer = build_char_tokenizer(sorted(set("abc ")))
    for text in ["é", "👨‍👩‍👧", "\x00\x07", "日本"]:
        ids = encode(tokenizer, text)
        assert len(ids) == len(text.encode("utf-8"))  # one byte token per byte, nothing dropped
        assert decode(tokenizer, ids) == text
    mixed = "abc é abc"
    assert decode(tokenizer, encode(tokenizer, mixed)) == mixed
    assert char_lookup_table(tokenizer)[ord("é")] == -1  # not a single token: the slow path handles it


def test_hard_strings_round_trip_and_end_of_text_is_special():
    tokenizer = build_char_tokenizer(sorted(set(TRAINING_TEXT)))
    for text in HARD_STRINGS:
        assert decode(tokenizer, encode(tokenizer, text)) == text
    eot = tokenizer.token_to_id(END_OF_TEXT)
    assert encode(tokenizer, END_OF_TEXT) == [eot]
    assert len(BYTE_SYMBOLS) == len(set(BYTE_SYMBOLS)) == 256


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_round_trips(text):
    tokenizer = _tokenizer_for_property_tests()
    assert decode(tokenizer, encode(tokenizer, text)) == text


_cached = {}


def _tokenizer_for_property_tests():
    if "tok" not in _cached:
        _cached["tok"] = build_char_tokenizer(sorted(set(TRAINING_TEXT)))
    return _cached["tok"]


# ------------------------------------------------------ the same tokenizer in llama.cpp

@pytest.fixture(scope="module", params=["mixed", "ascii-only", "bpe"])
def gguf_pair(request, tmp_path_factory):
    """A random model's F32 GGUF with a character tokenizer built from a text with multi-byte
    characters, one from an all-ASCII text (no merges of its own), and a trained BPE."""
    if request.param == "bpe":
        tokenizer = train_bpe_tokenizer(iter([TRAINING_TEXT, " ".join(HARD_STRINGS)]), 600)
    else:
        text = TRAINING_TEXT if request.param == "mixed" else "just plain ascii text, nothing else!\n"
        tokenizer = build_char_tokenizer(sorted(set(text)))
    torch.manual_seed(0)
    model = build_model({**CONFIG, "vocab_size": tokenizer.get_vocab_size()}).eval()
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    write_gguf_atomic(model, tokenizer, str(path), "F32")
    return model, tokenizer, GGUFModel(str(path), logits_all=True)


def test_llama_cpp_tokenizes_hard_strings_identically(gguf_pair):
    _, tokenizer, gguf_model = gguf_pair
    for text in HARD_STRINGS + [TRAINING_TEXT[:500]]:
        assert gguf_model.tokenize(text) == encode(tokenizer, text), repr(text)
        ids = encode(tokenizer, text)
        assert gguf_model.detokenize(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_llama_cpp_tokenizes_random_text_identically(gguf_pair, text):
    _, tokenizer, gguf_model = gguf_pair
    assert gguf_model.tokenize(text) == encode(tokenizer, text)


def test_only_end_of_text_ends_generation(gguf_pair):
    import llama_cpp
    _, tokenizer, gguf_model = gguf_pair
    vocab = llama_cpp.llama_model_get_vocab(gguf_model.llm._model.model)
    enders = [i for i in range(gguf_model.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    assert enders == [tokenizer.token_to_id(END_OF_TEXT)]


def test_f32_gguf_logits_match_pytorch(gguf_pair):
    model, tokenizer, gguf_model = gguf_pair
    ids = encode(tokenizer, TRAINING_TEXT)[:CONFIG["block_size"]]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    got = gguf_model.logits(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-3


def test_bpe_compresses_and_round_trips():
    tokenizer = train_bpe_tokenizer(iter([TRAINING_TEXT]), 400)
    assert 300 < tokenizer.get_vocab_size() <= 400
    ids = encode(tokenizer, TRAINING_TEXT)
    assert len(TRAINING_TEXT) / len(ids) > 2  # several characters per token on its own text
    for text in HARD_STRINGS:
        assert decode(tokenizer, encode(tokenizer, text)) == text
    assert encode(tokenizer, END_OF_TEXT) == [tokenizer.token_to_id(END_OF_TEXT)]
    assert char_lookup_table(tokenizer) is None  # not character level: no per-character shortcut
