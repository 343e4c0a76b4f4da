"""The whole pipeline on a text, timed stage by stage, then each GGUF type against PyTorch.

    python benchmarks/bench_pipeline.py [--text ../shared/data/tinyshakespeare.txt] [--max_epochs 2]

Runs the four scripts as a user would (small model: 4 layers, 4 heads, n_embd 128, block_size 64)
and prints each stage's wall time. Then, for F32, F16, Q8_0, Q4_0 and Q4_K_M, quantizes with
llama.cpp and prints tokenization agreement on the hard strings, next-token agreement and the
largest relative logit error against the PyTorch model on held-out windows.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from custom_llm.checks import HARD_STRINGS, check_export, held_out_windows  # noqa: E402
from custom_llm.corpus import find_documents  # noqa: E402
from custom_llm.text_data import text_dataset  # noqa: E402
from custom_llm.export import GGUF, quantize_atomic, write_gguf_atomic  # noqa: E402
from custom_llm.files import load_config, load_trained_model  # noqa: E402
from custom_llm.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
MODEL = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--dropout", "0"]


def stage(name, command, cwd):
    started = time.time()
    result = subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    seconds = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
    print(f"{name:18}{seconds:8.1f} s")
    return result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--max_epochs", type=int, default=2, help="train_llm.py's default recipe for this many epochs")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        print(f"stage               wall time   (text: {args.text}, {args.max_epochs} training epochs)")
        stage("1 llm_model.py", [os.path.join(REPO, "llm_model.py"), *MODEL, "-y"], folder)
        stage("2 train_llm.py", [os.path.join(REPO, "train_llm.py"), "--dataset_path", args.text,
                                 "--max_epochs", str(args.max_epochs), "-y"], folder)
        stage("3 convert_to_gguf", [os.path.join(REPO, "convert_to_gguf.py")], folder)
        stage("4 inference_gguf", [os.path.join(REPO, "inference_gguf.py"), "--query", "ROMEO:",
                                   "--max_tokens", "200", "--temperature", "0"], folder)

        config = load_config(os.path.join(folder, "model_config.pth"))
        model = load_trained_model(os.path.join(folder, "trained_model.pth"), config)
        tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
        held_out = text_dataset(find_documents(args.text), tokenizer).val.tolist()
        windows = held_out_windows(held_out, config["block_size"], count=16)
        f32 = os.path.join(folder, "model.f32.gguf")
        write_gguf_atomic(model, tokenizer, f32, "F32")
        print(f"\n{'type':8}{'size':>10}{'tokenization':>14}{'next token':>12}{'max rel. logit error':>22}")
        for quant_type in ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"):
            path = os.path.join(folder, f"model.{quant_type}.gguf")
            quantize_atomic(f32, path, quant_type)
            r = check_export(GGUF, path, model, tokenizer, windows)  # the same check convert_to_gguf.py runs
            agreement = f"{r['tokens_agree']}/{len(HARD_STRINGS)}"
            print(f"{quant_type:8}{r['size'] / 1024:9.0f}K{agreement:>14}"
                  f"{100 * r['next_agree']:11.1f}%{r['rel_error']:22.1e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
