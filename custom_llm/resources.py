"""What a generation cost the machine: CPU use, memory, GPU memory where used."""

import os
import shutil
import subprocess
import sys
import threading
import time

import psutil


class ResourceUse:
    """Measures the block it wraps. CPU % is the process's CPU time over the block's wall time
    (100% = one core busy the whole time). Memory is sampled by a background thread every
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
        self.cpu_percent = 100 * cpu / max(self.elapsed, 1e-9)
        self.gpu_memory = gpu_memory_of(os.getpid()) if self.gpu else None
        return False

    def _sample(self):
        while not self._done.wait(self.interval):
            self._note_rss()

    def _note_rss(self):
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        self.samples += 1

    def _cpu_seconds(self):
        times = self.process.cpu_times()
        return times.user + times.system


def peak_rss_bytes() -> int:
    """The most memory this process has held at once (its peak resident set size)."""
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
