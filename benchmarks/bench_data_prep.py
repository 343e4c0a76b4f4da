"""Data-preparation benchmark: tokenizing a large text file (1 GB by default) in chunks, and a
folder of many small documents against one file of the same size.

    python benchmarks/bench_data_prep.py [--size_mb 1024] [--folder_files 10000] [--folder_mb 100]
                                         [--repeats 3] [--text ../shared/data/tinyshakespeare.txt]

Builds the test texts in a temporary folder from the given text (repeated, with a line of non-ASCII
characters now and then so the slow path is exercised too): one file of --size_mb, and a folder of
--folder_files documents (in subfolders of 100) totalling --folder_mb with one file of the same
bytes beside it. Each is prepared in a fresh process cold (no cache) and warm (from the cache), the
best of --repeats runs.
Prints the CPU, MB/s, peak RSS, the token array's size for scale, and the folder's speed as a
ratio of the one file's (--size_mb 0 or --folder_files 0 leaves that part out).
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
sys.path.insert(0, REPO)

from custom_llm.precision import cpu_summary  # noqa: E402

PREPARE = """
import sys, time
sys.path.insert(0, {repo!r})
from custom_llm.corpus import find_documents
from custom_llm.text_data import text_dataset
started = time.time()
dataset = text_dataset(find_documents({path!r}))
print(time.time() - started, len(dataset.tokens), dataset.tokens.nbytes, dataset.from_cache)
"""


def sample_bytes(source: str) -> bytes:
    with open(source, encoding="utf-8") as f:
        return (f.read() + "\nUnicode now and then: café, naïve, 日本語, 🙂\n").encode("utf-8")


def build_file(data: bytes, path: str, size_bytes: int) -> None:
    with open(path, "wb") as out:
        written = 0
        while written < size_bytes:
            piece = data[:size_bytes - written]
            out.write(piece)
            written += len(piece)


def build_folder(data: bytes, folder: str, n_files: int, size_bytes: int) -> bytes:
    """n_files documents of about size_bytes in all, each a run of whole lines from the text;
    returns their bytes joined, for the one file of the same size."""
    per_file, at, written = size_bytes // n_files, 0, []
    for i in range(n_files):
        end = data.find(b"\n", at + per_file)
        end = len(data) if end < 0 else end + 1
        piece = data[at:end]
        at = 0 if end >= len(data) else end
        sub = os.path.join(folder, f"part{i // 100:03d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"doc{i:05d}.txt"), "wb") as out:
            out.write(piece)
        written.append(piece)
    return b"".join(written)


def prepare_in_fresh_process(path: str):
    code = PREPARE.format(repo=REPO, path=path)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("preparation failed")
    seconds, n_tokens, n_bytes, from_cache = output.split()
    return float(seconds), int(n_tokens), int(n_bytes), from_cache == "True", usage.ru_maxrss * 1024


def measure(label: str, path: str, size: int, repeats: int) -> dict:
    """Cold (the cache removed first), then cached: the best of `repeats` runs each, one line each
    (the best, as other work on the machine only ever slows a run down). MB/s by run."""
    cache = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), ".token_cache")
    speeds = {}
    for run in ("cold", "cached"):
        best = None
        for _ in range(repeats):
            if run == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            result = prepare_in_fresh_process(path)
            assert result[3] == (run == "cached")
            best = result if best is None or result[0] < best[0] else best
        seconds, n_tokens, n_bytes, _, rss = best
        speeds[run] = size / 1e6 / seconds
        print(f"{label:28}{run:8}{seconds:9.2f}{speeds[run]:9.0f}{rss / 2**20:10.0f}M"
              f"{n_tokens:15,}{n_bytes / 2**20:12.0f}M", flush=True)
    return speeds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=int, default=1024)
    parser.add_argument("--folder_files", type=int, default=10000)
    parser.add_argument("--folder_mb", type=int, default=100)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind; the best is shown")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    data = sample_bytes(args.text)
    workdir = tempfile.mkdtemp(prefix="bench-data-")
    try:
        started = time.time()
        if args.folder_files:
            folder = os.path.join(workdir, "folder")
            joined = build_folder(data, folder, args.folder_files, args.folder_mb << 20)
            os.makedirs(os.path.join(workdir, "same"))
            same = os.path.join(workdir, "same", "joined.txt")
            with open(same, "wb") as out:
                out.write(joined)
        if args.size_mb:
            big = os.path.join(workdir, "big.txt")
            build_file(data, big, args.size_mb << 20)
        print(f"built the test texts in {time.time() - started:.1f}s")
        print(f"{'text':28}{'run':8}{'seconds':>9}{'MB/s':>9}{'peak RSS':>11}{'tokens':>15}{'token array':>13}")
        if args.folder_files:
            size = len(joined)
            one = measure(f"one file, {size / 1e6:,.0f} MB", same, size, args.repeats)
            many = measure(f"{args.folder_files:,} files, {size / 1e6:,.0f} MB", folder, size, args.repeats)
            print(f"folder / one file: {many['cold'] / one['cold']:.2f}x the speed cold, "
                  f"{many['cached'] / one['cached']:.2f}x cached")
        if args.size_mb:
            size = os.path.getsize(big)
            measure(f"one file, {size / 1e6:,.0f} MB", big, size, args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
