"""Data-preparation benchmark: tokenizing a large text file (1 GB by default) in chunks.

    python benchmarks/bench_data_prep.py [--size_mb 1024] [--text ../shared/data/tinyshakespeare.txt]

Builds a file of the given size from the text (repeated, with a line of non-ASCII characters now
and then so the slow path is exercised too), then, in a fresh process each, prepares it cold (no
cache) and warm (from the cache). Prints MB/s, peak RSS, and the token array's size for scale.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")

PREPARE = """
import sys, time
sys.path.insert(0, {repo!r})
from custom_llm.data import prepare_dataset
started = time.time()
dataset = prepare_dataset({path!r})
print(time.time() - started, len(dataset.tokens), dataset.tokens.nbytes, dataset.from_cache)
"""


def build_file(source: str, path: str, size_bytes: int) -> None:
    with open(source, encoding="utf-8") as f:
        block = f.read() + "\nUnicode now and then: café, naïve, 日本語, 🙂\n"
    data = block.encode("utf-8")
    with open(path, "wb") as out:
        written = 0
        while written < size_bytes:
            piece = data[:size_bytes - written]
            out.write(piece)
            written += len(piece)


def prepare_in_fresh_process(path: str):
    code = PREPARE.format(repo=REPO, path=path)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("preparation failed")
    seconds, n_tokens, n_bytes, from_cache = output.split()
    return float(seconds), int(n_tokens), int(n_bytes), from_cache == "True", usage.ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=int, default=1024)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-data-")
    try:
        path = os.path.join(workdir, "big.txt")
        started = time.time()
        build_file(args.text, path, args.size_mb << 20)
        size = os.path.getsize(path)
        print(f"built {size / 1e6:,.0f} MB test file in {time.time() - started:.1f}s")
        print(f"{'run':8}{'seconds':>9}{'MB/s':>9}{'peak RSS':>11}{'tokens':>15}{'token array':>13}")
        for label in ("cold", "cached"):
            seconds, n_tokens, n_bytes, from_cache, rss = prepare_in_fresh_process(path)
            assert from_cache == (label == "cached")
            print(f"{label:8}{seconds:9.1f}{size / 1e6 / seconds:9.0f}{rss / 2**20:10.0f}M"
                  f"{n_tokens:15,}{n_bytes / 2**20:12.0f}M")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
