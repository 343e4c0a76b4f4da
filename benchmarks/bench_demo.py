"""The README's one pipeline command, as a new user runs it: its wall time and how much its model
writes words.

    python benchmarks/bench_demo.py                       # the command from README.md
    python benchmarks/bench_demo.py --command "python llm_model.py -y && ..."   # another candidate
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_demo.py   # a plain AVX2 CPU

Runs the command in an empty folder (so the default text is made too), then samples 400 tokens
at the default temperature from the GGUF it made, three times with different seeds, and counts the
words of three letters or more that occur in the training text.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from custom_llm.precision import cpu_summary  # noqa: E402

WORD = re.compile(r"[A-Za-z]{3,}")


def readme_command() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Run the whole pipeline", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def word_score(sample: str, known: set) -> tuple:
    words = WORD.findall(sample)
    return sum(w in known for w in words), len(words)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", default=None, help="default: the README's pipeline command")
    parser.add_argument("--keep", action="store_true", help="keep the folder it ran in")
    args = parser.parse_args()
    command = args.command or readme_command()
    # The scripts are called as in the README, from the folder they are run in.
    command = re.sub(r"python (\w+\.py)", lambda m: f"{sys.executable} {os.path.join(REPO, m.group(1))}", command)
    folder = tempfile.mkdtemp(prefix="bench-demo-")
    print(f"CPU: {cpu_summary()}\nfolder: {folder}\ncommand: {args.command or readme_command()}\n")
    started = time.time()
    result = subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    wall = time.time() - started
    print(result.stdout[-3000:])
    print(result.stderr[-1500:])
    if result.returncode != 0:
        raise SystemExit(f"the command failed with exit status {result.returncode}")
    with open(os.path.join(folder, "input.txt"), encoding="utf-8") as f:
        known = set(WORD.findall(f.read()))
    print(f"wall time of the whole command: {wall:.1f} s ({wall / 60:.2f} min)")
    gguf = os.path.join(folder, "model.gguf.Q4_0.gguf")
    for seed in (1, 2, 3):
        out = subprocess.run([sys.executable, os.path.join(REPO, "inference_gguf.py"), "--gguf_path", gguf,
                              "--query", "The", "--max_tokens", "400", "--seed", str(seed), "--json"],
                             cwd=folder, capture_output=True, text=True, check=True)
        sample = json.loads(out.stdout)["text"]
        hits, total = word_score(sample, known)
        print(f"\nseed {seed}: {hits} of {total} words of 3+ letters occur in the training text "
              f"({100 * hits / max(1, total):.0f}%)\n  {sample[:300]!r}")
    if not args.keep:
        subprocess.run(["rm", "-rf", folder])


if __name__ == "__main__":
    main()
