"""No llama.cpp front end crashes past the trained block: every GGUF that convert_to_gguf.py writes
(F32, F16 and every quantized type) is used as other front ends use it, through llama-cpp-python's
own Llama at the contexts they pick, with plain completion and chat; the trained positions stay
the model's; this project's own inference still slides at the trained block."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO

from custom_llm import gguf_keys
from custom_llm.export import quant_types, quantize_atomic, write_gguf_atomic, write_hf_folder
from custom_llm.gpt2 import GGUF_CONTEXT, POSITION_RULES, extended_positions, gguf_context_length
from custom_llm.model import build_model
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import END_OF_TEXT, build_char_tokenizer

BLOCK = 32
# n_embd 256: rows divide into every type's blocks (256 values for K-quants), so each file holds
# its own type, not a fallback.
CONFIG = {"n_embd": 256, "n_head": 4, "n_layer": 1, "block_size": BLOCK, "dropout": 0.0}

# Run in a child process: llama.cpp aborts the whole process when it reads past its position
# table, which must fail one test, not end the suite. It loads the file as a user of
# llama-cpp-python would; only llama.cpp's weight repacking is turned off, as this project's
# runtime does, because it crashes quantized models on CPUs with AMX whatever the context.
CHILD = r"""
import json, sys
import llama_cpp
from custom_llm.runtime import no_weight_repacking

path, block, end_of_text, to_the_end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
no_end = {end_of_text: -1e9}   # the model may not stop early: it must run past the block
text = "abc def ghij. " * 400


def outcome(generate):
    # [new tokens, why it stopped]; llama-cpp-python's own ValueError is recorded, not raised,
    # with the number of tokens it had stored
    try:
        out = generate()
    except ValueError as error:
        return [llm.n_tokens, f"ValueError: {error}"]
    return [out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]]


found = []
for n_ctx in (None, block, 2048, 4096, 0):    # None: llama-cpp-python's default
    with no_weight_repacking():
        llm = llama_cpp.Llama(model_path=path, verbose=False, **({} if n_ctx is None else {"n_ctx": n_ctx}))
    row = {"asked": n_ctx, "n_ctx": llm.n_ctx()}
    # A prompt of block - 4 tokens (one per character), then 12 new ones: past the block.
    row["call"] = outcome(lambda: llm(text[:block - 4], max_tokens=12, temperature=0, logit_bias=no_end))
    # A chat already longer than the block, in the format llama-cpp-python falls back to.
    messages = [{"role": "user", "content": text[:block]}, {"role": "assistant", "content": text[5:block]},
                {"role": "user", "content": text[:block // 2]}]
    row["chat"] = outcome(lambda: llm.create_chat_completion(messages, max_tokens=12, temperature=0,
                                                             logit_bias=no_end))
    if n_ctx == 4096 and to_the_end:
        # The last rows of the table: a prompt that ends 8 positions before the context does.
        row["end"] = outcome(lambda: llm(text[:4096 - 8], max_tokens=20, temperature=0, logit_bias=no_end))
    found.append(row)
    del llm
print(json.dumps(found))
"""

# Types also run to the last position of a 4096 context (a 4088-token prompt: slower).
TO_THE_END = {"F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"}


def run_child(path, tokenizer, to_the_end=False):
    return subprocess.run([sys.executable, "-c", CHILD, str(path), str(BLOCK),
                           str(tokenizer.token_to_id(END_OF_TEXT)), "1" if to_the_end else "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_and_f32(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer(list("abcdefghij ."))
    model = build_model({**CONFIG, "vocab_size": tokenizer.get_vocab_size()}).eval()
    folder = tmp_path_factory.mktemp("context")
    source = folder / "model.F32.gguf"
    write_gguf_atomic(model, tokenizer, str(source), "F32")
    return model, tokenizer, folder, source


def written(model_and_f32, kind):
    model, tokenizer, folder, source = model_and_f32
    if kind == "F32":
        return source
    path = folder / f"model.{kind}.gguf"
    if kind == "F16":
        write_gguf_atomic(model, tokenizer, str(path), "F16")
    else:
        try:
            quantize_atomic(str(source), str(path), kind)
        except Exception as error:
            if "requires an imatrix" not in str(error):
                raise
            pytest.skip(f"llama.cpp makes {kind} only with an importance matrix (convert_to_gguf.py cannot either)")
    return path


@pytest.mark.parametrize("kind", ["F32", "F16", *sorted(set(quant_types()) - {"F32", "F16"})])
def test_front_ends_run_past_the_block_at_every_context(model_and_f32, kind):
    _, tokenizer, _, _ = model_and_f32
    result = run_child(written(model_and_f32, kind), tokenizer, kind in TO_THE_END)
    assert result.returncode == 0, f"{kind}: exit {result.returncode}\n{result.stderr[-2000:]}"
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    table = gguf_context_length(BLOCK)
    assert [row["n_ctx"] for row in rows] == [512, 256, 2048, 4096, table]   # 0: the file's context
    for row in rows:
        for way in ("call", "chat"):
            if row["asked"] == BLOCK and row[way][1].startswith("ValueError"):
                # llama-cpp-python sizes its own token buffer by the n_ctx passed while llama.cpp
                # rounds the context up to 256: past the n_ctx passed it raises ValueError, a
                # Python exception (the process lives), after llama.cpp computed that position.
                assert "could not broadcast" in row[way][1] and row[way][0] == BLOCK, (kind, row)
            else:   # (the chat counts its tokens by tokenizing the reply's text again: at least 12)
                assert row[way][1] == "length" and row[way][0] >= 12, (kind, row)
        assert ("end" in row) == (row["asked"] == 4096 and kind in TO_THE_END)
        if "end" in row:   # up to the last position of the context, then a clean stop
            n_new, reason = row["end"]
            assert 4096 - 8 + n_new >= 4096 and reason == "length", (kind, row)


def test_a_table_of_the_block_alone_crashes_the_child(model_and_f32):
    """The files written before the table was extended: llama-cpp-python's default context
    aborts the process at position BLOCK. (So the test above would see a crash.)"""
    model, tokenizer, folder, _ = model_and_f32
    path = folder / "block-only.gguf"
    write_gguf_atomic(model, tokenizer, str(path), "F32", context_length=BLOCK)
    result = run_child(path, tokenizer)
    assert result.returncode != 0 and "GGML_ASSERT" in result.stderr


def test_the_trained_rows_are_kept_and_the_rest_follow_the_rule(model_and_f32):
    model, _, _, source = model_and_f32
    reader = gguf.GGUFReader(str(source))
    fields = {name: field.parts[field.data[0]] for name, field in reader.fields.items()}
    table = next(t for t in reader.tensors if t.name == "position_embd.weight")
    rows = gguf_context_length(BLOCK)
    trained = model.wpe.weight.detach().numpy()
    assert rows == GGUF_CONTEXT and int(fields["gpt2.context_length"][0]) == rows == table.data.shape[0]
    assert int(fields[gguf_keys.TRAINED_CONTEXT][0]) == BLOCK
    assert np.array_equal(table.data[:BLOCK], trained)
    assert np.array_equal(table.data, extended_positions(trained, rows))
    description = bytes(fields["general.description"]).decode()
    assert f"trained on a context of {BLOCK} tokens" in description and str(rows) in description


@pytest.mark.parametrize("rule", sorted(POSITION_RULES))
def test_every_rule_keeps_the_trained_rows(rule):
    trained = np.random.default_rng(0).normal(size=(BLOCK, 8)).astype(np.float32)
    table = extended_positions(trained, 300, rule)
    assert table.shape == (300, 8) and np.array_equal(table[:BLOCK], trained)
    assert np.isfinite(table).all()


def test_the_table_covers_every_context_llama_cpp_rounds_to():
    assert gguf_context_length(64) == 4096
    assert gguf_context_length(5000) == 5120   # llama.cpp gives a context of 5000 as 5120


def test_this_projects_inference_slides_at_the_trained_block(model_and_f32):
    model, tokenizer, _, source = model_and_f32
    gguf_model = GGUFModel(str(source), logits_all=True)
    assert gguf_model.block_size == BLOCK
    assert gguf_model.llm.n_ctx() == 256   # the trained block, rounded up by llama.cpp; not the table
    ids = [1, 2, 3, 4, 5] * 6
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    got = gguf_model.logits(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-3
    # Generation far past the block keeps to positions below it (a crash would end pytest here).
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)

    def greedy_but_never_the_end(logits):
        logits = logits.copy()
        logits[end_of_text] = -np.inf
        return int(np.argmax(logits))
    tokens = list(gguf_model.generate([1, 2, 3], 3 * BLOCK, greedy_but_never_the_end))
    assert len(tokens) == 3 * BLOCK


def test_the_hugging_face_export_keeps_the_trained_positions(model_and_f32, tmp_path):
    """transformers and the servers built on it read n_positions and keep within it: the HF
    export stays the trained table, exactly."""
    import transformers
    model, tokenizer, _, _ = model_and_f32
    write_hf_folder(model, tokenizer, str(tmp_path))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)
    assert config.n_positions == BLOCK


@pytest.mark.parametrize("kind,tolerance", [("F32", 1e-5), ("F16", 1e-2), ("Q8_0", 5e-2)])
def test_transformers_reads_a_gpt2_gguf_told_its_context(model_and_f32, kind, tolerance):
    """transformers' own GGUF reader maps gpt2.context_length to GPT2Config.n_ctx, not to
    n_positions, which sizes the position table: alone it makes 1,024 rows and refuses every GPT-2
    GGUF whose table differs (ours: 4,096 rows; a table of the block alone was refused too). Told
    n_positions, the file's context_length, it reads the file and computes the trained model."""
    from transformers import AutoModelForCausalLM
    model, _, folder, _ = model_and_f32
    path = written(model_and_f32, kind)
    rows = int(gguf.GGUFReader(str(path)).fields["gpt2.context_length"].parts[-1][0])
    assert rows == GGUF_CONTEXT
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name, local_files_only=True,
                                              n_positions=rows).eval()
    ids = torch.randint(0, model.config["vocab_size"], (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids)[0], hf(ids).logits
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()
