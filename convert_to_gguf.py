"""Stage 3: export the trained model to Hugging Face format and to GGUF, then quantize it.

    python convert_to_gguf.py                      # hf_model/, model.gguf, model.gguf.Q4_0.gguf
    python convert_to_gguf.py --quant_type Q8_0

No llama.cpp checkout is needed: the GGUF is written with the `gguf` package and quantized by
llama.cpp's own quantizer inside llama-cpp-python. Afterwards every file is checked against
the PyTorch model: same tokens, same logits within float tolerance.
"""

import os
import time

import numpy as np
import torch

from custom_llm.cli import ArgumentParser, UserError, human_bytes, run
from custom_llm.data import prepare_dataset
from custom_llm.export import (check_quant_type, export_hf, quantize, tensor_types, write_gguf)
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import HARD_STRINGS, encode, load_tokenizer
from llm_model import load_config, load_trained_model

# Largest relative logit error (max |difference| / max |logit|) accepted for unquantized files.
# llama.cpp computes some steps in half precision, so even F32 is not bit-exact.
TOLERANCE = {"F32": 2e-3, "F16": 1e-2}


def held_out_windows(text_path: str, tokenizer, block_size: int, count: int = 4) -> list:
    """Up to `count` windows of block_size tokens from the held-out last 10% of the text: the
    same validation tokens training used."""
    tokens = prepare_dataset(text_path, tokenizer=tokenizer).val
    windows = [tokens[i:i + block_size].tolist() for i in range(0, len(tokens) - block_size + 1, block_size)]
    return windows[:count] or ([tokens.tolist()] if len(tokens) else [])


def check_gguf_file(path, model, tokenizer, windows):
    """Compare a GGUF with the PyTorch model: tokenization, next-token choice, logits."""
    gguf_model = GGUFModel(path, logits_all=True)
    agree = sum(gguf_model.tokenize(s) == encode(tokenizer, s) for s in HARD_STRINGS)
    same_next, total, worst = 0, 0, 0.0
    for window in windows:
        expected = model(torch.tensor([window]))[0][0].float().numpy()
        got = gguf_model.logits(window)
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
        same_next += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(window)
    _, bits_per_weight = tensor_types(path)
    return {"size": os.path.getsize(path), "bpw": bits_per_weight, "tokens_agree": agree,
            "next_agree": same_next / max(1, total), "rel_error": worst}


def check_hf(output_dir, model, windows):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_model = AutoModelForCausalLM.from_pretrained(output_dir, local_files_only=True).eval()
    AutoTokenizer.from_pretrained(output_dir, local_files_only=True)
    worst = 0.0
    with torch.no_grad():
        for window in windows:
            expected = model(torch.tensor([window]))[0]
            got = hf_model(torch.tensor([window])).logits
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def main():
    parser = ArgumentParser(description="Export the trained model to Hugging Face and GGUF, quantized.")
    parser.add_argument("--model_path", default="trained_model.pth")
    parser.add_argument("--config_path", default="model_config.pth")
    parser.add_argument("--tokenizer_path", default="tokenizer.json")
    parser.add_argument("--output_dir", default="hf_model", help="Hugging Face folder to write")
    parser.add_argument("--gguf_output", default="model.gguf", help="F16 GGUF to write")
    parser.add_argument("--quant_type", default="Q4_0", help="llama.cpp quantization type (e.g. Q8_0, Q4_K_M)")
    parser.add_argument("--llama_cpp_path", default=None,
                        help="optional llama.cpp checkout whose llama-quantize to use instead")
    parser.add_argument("--eval_text", default=None,
                        help="text for the checks (default: the training text recorded in the config)")
    args = parser.parse_args()

    # Load.
    quant_type = check_quant_type(args.quant_type)
    config = load_config(args.config_path)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise UserError(f"{args.tokenizer_path} has {tokenizer.get_vocab_size()} tokens but the model "
                        f"config says vocab_size {config['vocab_size']}: they come from different "
                        "training runs; retrain with `python train_llm.py`")
    model = load_trained_model(args.model_path, config)
    eval_path = args.eval_text or config.get("dataset_path")
    if eval_path and os.path.exists(eval_path):
        windows = held_out_windows(eval_path, tokenizer, config["block_size"])
    else:
        print("note: training text not found; checking logits on the built-in test strings instead")
        windows = [w for w in (encode(tokenizer, s)[:config["block_size"]] for s in HARD_STRINGS) if w]

    # Export.
    started = time.time()
    export_hf(model, tokenizer, args.output_dir)
    print(f"Wrote {args.output_dir}/ (Hugging Face GPT2LMHeadModel + tokenizer)")
    write_gguf(model, tokenizer, args.gguf_output, "F16")
    print(f"Wrote {args.gguf_output} (F16)")

    quantized = f"{args.gguf_output}.{quant_type}.gguf"
    # Quantize from full-precision weights, not from the F16 file, so nothing is rounded twice.
    source = f"{args.gguf_output}.source-f32.tmp"
    try:
        write_gguf(model, tokenizer, source, "F32")
        fallbacks = quantize(source, quantized, quant_type, args.llama_cpp_path)
    finally:
        if os.path.exists(source):
            os.remove(source)
    types, _ = tensor_types(quantized)
    counts = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    print(f"Wrote {quantized} ({quant_type}; tensor types: "
          + ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ")")
    if fallbacks:
        print(f"note: {fallbacks} of {len(types)} tensors have rows that do not divide into {quant_type}'s "
              f"blocks, so llama.cpp gave them another type (n_embd {config['n_embd']}; "
              "a multiple of 256 avoids this)")
    print(f"Export took {time.time() - started:.1f}s")

    # Check what was written against the PyTorch model.
    hf_error = check_hf(args.output_dir, model, windows)
    print(f"Check {args.output_dir}/: max relative logit error {hf_error:.1e} vs PyTorch")
    failures = []
    if hf_error > TOLERANCE["F32"]:
        failures.append(f"{args.output_dir} logits differ from PyTorch by {hf_error:.1e}")
    n_hard = len(HARD_STRINGS)
    with torch.no_grad():
        for path, kind in ((args.gguf_output, "F16"), (quantized, quant_type)):
            r = check_gguf_file(path, model, tokenizer, windows)
            print(f"Check {path}: {human_bytes(r['size'])}, {r['bpw']:.2f} bits/weight, "
                  f"tokenization {r['tokens_agree']}/{n_hard} strings equal, "
                  f"next token {100 * r['next_agree']:.1f}% equal, max relative logit error {r['rel_error']:.1e}")
            if r["tokens_agree"] != n_hard:
                failures.append(f"{path} tokenizes {n_hard - r['tokens_agree']} test string(s) differently")
            if kind in TOLERANCE and r["rel_error"] > TOLERANCE[kind]:
                failures.append(f"{path} logits differ from PyTorch by {r['rel_error']:.1e} "
                                f"(tolerance {TOLERANCE[kind]:.0e} for {kind})")
    if failures:
        raise UserError("; ".join(failures))
    print(f"Done. Try it: python inference_gguf.py --gguf_path {quantized} --query \"Hello\"")


if __name__ == "__main__":
    run(main)
