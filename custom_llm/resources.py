"""What a generation cost the machine (CPU use, memory, GPU memory where used), and how many
threads llama.cpp should run on it."""

import os
import shutil
import subprocess
import sys
import threading
import time

import psutil


class ResourceUse:
    """Measures the block it wraps. CPU % is the process's CPU time over the block's wall time
    (100% = one core busy the whole time), read from a clock precise to the microsecond: the
    per-process tick counts (10 ms on Linux) would turn one tick within a 1 ms generation into
    1000%. Where the clock is coarse anyway (Windows: 15.6 ms), the share is capped at 100% per
    core. Memory is sampled by a background thread every
    `interval` seconds while the block runs (and at its start and end), so the peak is the
    peak of this generation, not of model loading earlier."""

    def __init__(self, interval: float = 0.02, gpu: bool = False):
        self.interval, self.gpu = interval, gpu
        self.process = psutil.Process()

    def __enter__(self):
        self.peak_rss = self.process.memory_info().rss
        self.samples = 1
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.started, self.cpu_started = time.perf_counter(), self._cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.started
        cpu = self._cpu_seconds() - self.cpu_started
        self._done.set()
        self._thread.join()
        self._note_rss()
        self.cpu_percent = min(100 * cpu / max(self.elapsed, 1e-9), 100 * (os.cpu_count() or 1))
        self.gpu_memory = gpu_memory_of(os.getpid()) if self.gpu else None
        return False

    def _sample(self):
        while not self._done.wait(self.interval):
            self._note_rss()

    def _note_rss(self):
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        self.samples += 1

    @staticmethod
    def _cpu_seconds():
        return time.process_time()   # every thread of this process, llama.cpp's included


def peak_rss_bytes() -> int:
    """The most memory this process has held at once (its peak resident set size). On Linux it is
    read from /proc (VmHWM, this program's own): getrusage's ru_maxrss keeps the peak of the
    process it was started from (a fork carries it through exec), so a script started by a large
    process (a test runner holding 0.67 GB) reported that as its own peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return psutil.Process().memory_info().peak_wset
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def gpu_memory_of(pid: int):
    """Bytes of GPU memory the process holds (NVIDIA, through nvidia-smi), or None if unknown."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1]) * 1024 * 1024  # MiB
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


# ------------------------------------------------------------------ llama.cpp's threads

# Measured on 2 cores (AMD EPYC, Zen 5), one core decodes about 13 MB of Q4_0 weights (25 MB of
# F16) per millisecond: 16 MiB is about a millisecond of one thread's work per token.
BYTES_PER_THREAD = 16 * 2**20
# Other programs' use, in cores, let pass before free cores are rounded down: a blip of a shell
# leaves a core free, a third of a core taken does not.
BUSY_TOLERANCE = 0.1
# How long the CPUs are watched before a model large enough for several threads is loaded.
BUSY_WINDOW_S = 0.25


def choose_threads(weight_bytes: int, cores: int, busy_cores: float) -> int:
    """llama.cpp's thread count for a model whose token reads weight_bytes of weights, on `cores`
    cores of which other programs keep busy_cores busy (0.0: idle; 2.0: a training run on two).

        threads = max(1, min(weight_bytes // BYTES_PER_THREAD, free cores))
        free cores = int(cores - busy_cores + BUSY_TOLERANCE)

    Why. llama.cpp splits every operation of a token between its threads, which then meet at a
    barrier (hundreds per token), spinning while they wait. When another program wants the
    cores, the OS takes one thread off its core for a time slice (milliseconds), and every
    other thread waits at the next barrier until it is back. On 2 cores beside a training run,
    2 threads generated 14-1,540 tokens/s with the 0.9M-parameter demo model and 16-58 with a
    100M-parameter one (Q4_0), where 1 thread kept 2,900-5,900 and 114-155, and the first token
    took up to 2.3 s: a collapse, where a second thread gains 15-45% on an idle machine. So no
    more threads than free cores, and a core is free only when others leave it nearly idle; with
    none free, one thread, which the OS shares out fairly instead of stalling.
    A small model gets one thread whatever the load: below BYTES_PER_THREAD of weights per token
    a token takes about a millisecond or less on one core, a second thread saves tens of
    microseconds of it (the demo model: 0.17 ms against 0.14 ms; on some machines one thread is
    the faster), and the stall above costs milliseconds. The same bound keeps each thread at
    BYTES_PER_THREAD of work per token on machines with many cores, where more threads would
    wait at barriers longer than they work between them (reasoned, not measured: the machines
    measured had 2 cores)."""
    by_size = weight_bytes // BYTES_PER_THREAD
    free = int(cores - busy_cores + BUSY_TOLERANCE)
    return max(1, min(by_size, free))


def llama_threads(path: str) -> int:
    """choose_threads for the GGUF at path on this machine now. The CPUs are watched for
    BUSY_WINDOW_S only when the model is large enough for more than one thread."""
    size, cores = weight_bytes_per_token(path), usable_cores()
    if choose_threads(size, cores, 0.0) == 1:
        return 1
    return choose_threads(size, cores, cores * busy_fraction(BUSY_WINDOW_S))


def weight_bytes_per_token(path: str) -> int:
    """The bytes of weights one token's decode reads: every tensor of the GGUF but the position
    table (a token reads one row of it), and the token embedding where the model has its own
    output matrix (one row again; a tied embedding is the output matrix, read whole)."""
    import gguf
    tensors = gguf.GGUFReader(path).tensors
    names = {tensor.name for tensor in tensors}
    rows_only = {"position_embd.weight"} | ({"token_embd.weight"} if "output.weight" in names else set())
    return sum(int(tensor.n_bytes) for tensor in tensors if tensor.name not in rows_only)


def allowed_cpus() -> list:
    """The CPUs this process may run on (its affinity, e.g. a container's cpuset)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:   # macOS, Windows
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """The cores llama.cpp's threads can have: the CPUs this process may use, at most one per
    physical core (two threads on the halves of one core share its arithmetic units)."""
    allowed = len(allowed_cpus())
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, physical))


def busy_fraction(seconds: float) -> float:
    """The share of the time that this process's CPUs were busy over the next `seconds`, while
    this process sleeps (so: other programs' share). 0.0 idle, 1.0 every CPU busy."""
    before = psutil.cpu_times(percpu=True)
    time.sleep(seconds)
    after = psutil.cpu_times(percpu=True)
    total = idle = 0.0
    for cpu in allowed_cpus():
        if cpu < min(len(before), len(after)):
            total += _all_time(after[cpu]) - _all_time(before[cpu])
            idle += _idle_time(after[cpu]) - _idle_time(before[cpu])
    return min(1.0, max(0.0, 1 - idle / total)) if total > 0 else 0.0


def _all_time(times) -> float:
    # Linux counts a guest's time in user time too.
    return sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _idle_time(times) -> float:
    return times.idle + getattr(times, "iowait", 0.0)
