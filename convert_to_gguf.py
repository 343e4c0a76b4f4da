"""Stage 3: export the trained model to Hugging Face format and to GGUF, then quantize it.

    python convert_to_gguf.py                      # hf_model/, model.gguf, model.gguf.Q4_0.gguf
    python convert_to_gguf.py --quant_type Q8_0
    python convert_to_gguf.py --quant_type Q8_0,Q4_0,Q4_K_M   # several types, and what each costs
    python convert_to_gguf.py --report             # a standard set of types, and what each costs

No llama.cpp checkout is needed: the GGUF is written with the `gguf` package and quantized by
llama.cpp's own quantizer inside llama-cpp-python. Afterwards every file is checked against
the PyTorch model: same tokens, same logits within float tolerance. With several types (or
--report) a table follows: size, bits per weight, perplexity through llama.cpp on held-out text,
its ratio to the PyTorch model's perplexity on the same windows, and top-1 next-token agreement.
"""

import os
import time

import numpy as np
import torch

from custom_llm.cli import ArgumentParser, UserError, human_bytes, run
from custom_llm.data import prepare_dataset
from custom_llm.evaluation import evaluation_windows, pytorch_logits, report_table, score
from custom_llm.export import (check_quant_type, export_hf, quantize, tensor_types, write_gguf)
from custom_llm.runtime import GGUFModel
from custom_llm.tokenizer import HARD_STRINGS, encode, load_tokenizer
from llm_model import load_config, load_trained_model

# Largest relative logit error (max |difference| / max |logit|) accepted for unquantized files.
# llama.cpp computes some steps in half precision, so even F32 is not bit-exact.
TOLERANCE = {"F32": 2e-3, "F16": 1e-2}
# What --report quantizes to when --quant_type does not say: from near-lossless to 2-bit.
REPORT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]


def evaluation_tokens(args, config, tokenizer):
    """The held-out tokens: all of --eval_text, else the last 10% of the training text (which
    training never learned from). None when neither is there."""
    if args.eval_text:
        if not os.path.isfile(args.eval_text):
            raise UserError(f"--eval_text {args.eval_text} is not a file: give the path of a text "
                            "file to evaluate on", 2)
        return prepare_dataset(args.eval_text, tokenizer=tokenizer).tokens.tolist(), args.eval_text
    path = config.get("dataset_path")
    if path and os.path.exists(path):  # the same validation tokens training used
        return prepare_dataset(path, tokenizer=tokenizer).val.tolist(), f"the last 10% of {path}"
    return None, None


def held_out_windows(tokens: list, block_size: int, count: int = 4) -> list:
    """Up to `count` windows of block_size tokens, for the quick checks."""
    windows = [tokens[i:i + block_size] for i in range(0, len(tokens) - block_size + 1, block_size)]
    return windows[:count] or ([tokens] if tokens else [])


def parse_quant_types(text):
    """'Q8_0,Q4_0' -> ['Q8_0', 'Q4_0'], each checked, duplicates dropped."""
    names = [check_quant_type(name.strip()) for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--quant_type {text!r} names no type; e.g. Q4_0 or Q8_0,Q4_0,Q4_K_M", 2)
    return list(dict.fromkeys(names))


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
    parser.add_argument("--quant_type", default=None,
                        help="llama.cpp quantization type(s), comma-separated (default Q4_0; e.g. Q8_0,Q4_K_M)")
    parser.add_argument("--report", action="store_true",
                        help="print what each type costs (perplexity, agreement); without --quant_type, "
                             f"quantizes to {','.join(REPORT_TYPES)}")
    parser.add_argument("--eval_tokens", type=int, default=32768,
                        help="held-out tokens the report evaluates (0: all of them)")
    parser.add_argument("--llama_cpp_path", default=None,
                        help="optional llama.cpp checkout whose llama-quantize to use instead")
    parser.add_argument("--eval_text", default=None,
                        help="held-out text for the checks and the report (default: the last 10%% of "
                             "the training text recorded in the config)")
    args = parser.parse_args()

    # Load.
    if args.quant_type is None:
        quant_types = REPORT_TYPES if args.report else ["Q4_0"]
    else:
        quant_types = parse_quant_types(args.quant_type)
    show_report = args.report or len(quant_types) > 1
    if args.eval_tokens < 0:
        raise UserError(f"--eval_tokens: {args.eval_tokens} must be 0 (all) or a positive number", 2)
    config = load_config(args.config_path)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise UserError(f"{args.tokenizer_path} has {tokenizer.get_vocab_size()} tokens but the model "
                        f"config says vocab_size {config['vocab_size']}: they come from different "
                        "training runs; retrain with `python train_llm.py`")
    model = load_trained_model(args.model_path, config)
    eval_tokens, eval_source = evaluation_tokens(args, config, tokenizer)
    if eval_tokens and len(eval_tokens) > 1:
        windows = held_out_windows(eval_tokens, config["block_size"])
    elif show_report:
        raise UserError("the report needs held-out text, and the training text recorded in the config "
                        f"({config.get('dataset_path')}) is not there: pass --eval_text FILE", 2)
    else:
        print("note: training text not found; checking logits on the built-in test strings instead")
        windows = [w for w in (encode(tokenizer, s)[:config["block_size"]] for s in HARD_STRINGS) if w]

    # Export.
    started = time.time()
    export_hf(model, tokenizer, args.output_dir)
    print(f"Wrote {args.output_dir}/ (Hugging Face GPT2LMHeadModel + tokenizer)")
    write_gguf(model, tokenizer, args.gguf_output, "F16")
    print(f"Wrote {args.gguf_output} (F16)")

    # Quantize from full-precision weights, not from the F16 file, so nothing is rounded twice.
    source = f"{args.gguf_output}.source-f32.tmp"
    quantized = {}
    try:
        write_gguf(model, tokenizer, source, "F32")
        for quant_type in quant_types:
            quantized[quant_type] = f"{args.gguf_output}.{quant_type}.gguf"
            fallbacks = quantize(source, quantized[quant_type], quant_type, args.llama_cpp_path)
            report_written(quantized[quant_type], quant_type, fallbacks, config)
    finally:
        if os.path.exists(source):
            os.remove(source)
    print(f"Export took {time.time() - started:.1f}s")

    # Check what was written against the PyTorch model.
    hf_error = check_hf(args.output_dir, model, windows)
    print(f"Check {args.output_dir}/: max relative logit error {hf_error:.1e} vs PyTorch")
    failures = []
    if hf_error > TOLERANCE["F32"]:
        failures.append(f"{args.output_dir} logits differ from PyTorch by {hf_error:.1e}")
    n_hard = len(HARD_STRINGS)
    with torch.no_grad():
        for kind, path in [("F16", args.gguf_output), *quantized.items()]:
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
    if show_report:
        print_report(model, eval_tokens, eval_source, args, {"F16": args.gguf_output, **quantized})
    suggested = quantized.get("Q4_0", quantized[quant_types[0]])
    print(f"Done. Try it: python inference_gguf.py --gguf_path {suggested} --query \"Hello\"")


def report_written(path, quant_type, fallbacks, config):
    types, _ = tensor_types(path)
    counts = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    print(f"Wrote {path} ({quant_type}; tensor types: "
          + ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ")")
    if fallbacks:
        print(f"note: {fallbacks} of {len(types)} tensors have rows that do not divide into {quant_type}'s "
              f"blocks, so llama.cpp gave them another type (n_embd {config['n_embd']}; "
              "a multiple of 256 avoids this)")


def print_report(model, eval_tokens, eval_source, args, files):
    """Perplexity of the PyTorch model and of each file on the same windows, and how often
    each file's likeliest next token is PyTorch's."""
    windows = evaluation_windows(eval_tokens, model.block_size, args.eval_tokens)
    n_predicted = sum(len(targets) for _, targets in windows)
    print(f"\nWhat quantization costs, on {n_predicted:,} tokens of {eval_source} "
          f"({len(windows)} windows of {model.block_size} tokens, not overlapping):")
    started = time.time()
    reference = score(pytorch_logits(model), windows)
    rows = [{"name": "PyTorch (F32)", "size": None, "bpw": None, "perplexity": reference.perplexity,
             "ratio": None, "agreement": None}]
    for kind, path in files.items():
        scores = score(GGUFModel(path, logits_all=True).logits, windows)
        _, bpw = tensor_types(path)
        rows.append({"name": kind, "size": os.path.getsize(path), "bpw": bpw,
                     "perplexity": scores.perplexity, "ratio": scores.perplexity / reference.perplexity,
                     "agreement": scores.agreement(reference)})
    print(report_table(rows))
    print(f"(evaluated in {time.time() - started:.1f}s)")


if __name__ == "__main__":
    run(main)
