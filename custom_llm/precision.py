"""Which number format trains fastest on this machine: bfloat16 or float32, decided per machine.

bfloat16 halves the bytes of every matrix product, but only hardware with native bfloat16 matrix
units runs it faster: CUDA GPUs since Ampere, Intel Xeons with AMX tiles. Elsewhere (AVX2 laptops,
desktops and servers, CPUs with AVX512-BF16 but no AMX) a bfloat16 product is slower than a float32
one, up to 5x on an AVX2-only AMD EPYC. A rule written from CPU flags would be wrong for CPUs it
did not list, so on a CPU the choice is measured: a probe of a fraction of a second times the same
layer (forward and backward) in both formats, once per machine, and the answer is cached.

The one choice covers every precision decision in training: the autocast dtype of the forward
and backward passes, and the dtype of Muon's Newton-Schulz orthogonalization.
"""

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from custom_llm.cache import user_cache_folder

# bfloat16 must be at least this much faster on the probe to be chosen: the probe times matrix
# products only, and the rest of a training step (casts, attention kept in float32, the
# optimizer) gains nothing, so a small win on the probe is no win on the step.
BFLOAT16_MIN_SPEEDUP = 1.3
PROBE_VERSION = 1
# Environment variables that change which kernels torch may use, and so the probe's answer.
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


@dataclass
class Precision:
    dtype: torch.dtype      # autocast dtype of forward and backward (float32: no autocast)
    reason: str             # said at start-up

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    def describe(self) -> str:
        return f"{'bfloat16 autocast' if self.autocast else 'float32'} ({self.reason})"


def choose_precision(requested: str, device_type: str, probe=None) -> Precision:
    """requested: auto, float32 or bfloat16 (--dtype). probe() -> (float32 s, bfloat16 s), for tests."""
    if requested != "auto":
        return Precision(getattr(torch, requested), f"--dtype {requested}")
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "this GPU has native bfloat16")
        return Precision(torch.float32, "this GPU has no native bfloat16")
    float32_s, bfloat16_s = (probe or cached_probe)()
    speedup = float32_s / bfloat16_s
    if speedup >= BFLOAT16_MIN_SPEEDUP:
        return Precision(torch.bfloat16, f"bfloat16 matrix products measured {speedup:.1f}x as fast as "
                                         "float32 on this CPU")
    return Precision(torch.float32, f"bfloat16 matrix products measured {speedup:.1f}x the speed of "
                                    "float32 on this CPU: no native bfloat16 here")


def probe_seconds(repeats: int = 5) -> tuple:
    """Best-of-repeats seconds of one linear layer's forward and backward at a training-like shape
    (1024 rows of 256 features into 768), in float32 and under bfloat16 autocast. Where bfloat16
    is emulated its first run alone shows it (tens of times slower): the probe stops there, so it
    costs well under a second everywhere."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=generator, requires_grad=True)
    weight = torch.randn(768, 256, generator=generator, requires_grad=True)

    def once(bfloat16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            out = F.linear(x, weight)
        out.float().sum().backward()
        return time.perf_counter() - started

    # One thread: the ratio is a property of a core, and a single thread is not stalled at every
    # barrier by another program's work the way a team of threads is.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _alternate(once, repeats)
    finally:
        torch.set_num_threads(threads)


def _alternate(once, repeats):
    once(False)  # the first run of each warms up kernels and caches
    first_bfloat16_s = once(True)
    float32_s = once(False)
    if first_bfloat16_s > 10 * float32_s:
        return float32_s, first_bfloat16_s
    # Alternate and keep the best of each: a busy machine slows some runs, never speeds one up.
    bfloat16_s = float("inf")
    for _ in range(repeats):
        bfloat16_s = min(bfloat16_s, once(True))
        float32_s = min(float32_s, once(False))
    return float32_s, bfloat16_s


def cpu_info() -> tuple:
    """(CPU name, set of instruction-set flags) from /proc/cpuinfo, or what platform knows."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return name, flags
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith(("flags", "Features"))),
                 flags)
    return name, flags


def machine_key() -> str:
    """What the probe's answer depends on: the CPU, torch, the thread count and ISA limits."""
    name, flags = cpu_info()
    parts = [name, " ".join(sorted(flags)), torch.__version__, str(torch.get_num_threads()),
             *(f"{variable}={os.environ.get(variable, '')}" for variable in ISA_VARIABLES)]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def cache_file() -> str:
    return os.path.join(user_cache_folder(), "precision.json")


def cached_probe() -> tuple:
    """The probe's (float32 s, bfloat16 s) for this machine: measured once, then read from the cache."""
    path, key = cache_file(), f"v{PROBE_VERSION}-{machine_key()}"
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), list) and len(known[key]) == 2:
        return tuple(known[key])
    measured = probe_seconds()
    known[key] = list(measured)
    try:  # the cache is an optimisation: a read-only home only means probing again next time
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return measured


def cpu_summary() -> str:
    """The CPU's name and the instruction sets that decide training speed, for benchmark headers."""
    name, flags = cpu_info()
    has = {flag: "yes" if flag in flags else "no" for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}
    limits = ", ".join(f"{v}={os.environ[v]}" for v in ISA_VARIABLES if os.environ.get(v))
    return (f"{name}, {os.cpu_count()} logical CPUs; AVX2 {has['avx2']}, AVX-512 {has['avx512f']}, "
            f"AVX512-BF16 {has['avx512_bf16']}, AMX {has['amx_bf16']}" + (f"; limited by {limits}" if limits else ""))
