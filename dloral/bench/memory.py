"""Peak memory of one method's timed passes, measured on its own, never the process's high-water
mark (which earlier methods, clips, decoding and model building have already raised).

`PeakMemory` wraps the passes and gives the peak increase in memory in use over what was in use
as they started:

- CUDA: the allocator's count. Peak statistics are reset as the passes start; the value is
  `max_memory_allocated` minus `memory_allocated` at that moment.
- CPU: the resident set size (RSS). Freed heap blocks are first handed back to the system (glibc
  `malloc_trim`), so that what earlier runs freed does not hide this one's growth. Linux lets a
  process reset its peak RSS (VmHWM) to its current RSS (`5` to /proc/self/clear_refs): the peak
  is then read from VmHWM, exactly. Where that is refused, a thread samples the RSS every 2 ms
  (a peak shorter than that can be missed). Without /proc, nothing is measured (None).

The benchmark adds the method's own model tensors (resident before the passes) to this increase.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

SAMPLE_S = 0.002
_PROC = "/proc/self"


def tensor_bytes(module: torch.nn.Module | None, device: torch.device) -> int:
    """Bytes of the parameters and buffers of `module` that live on `device`'s type."""
    if module is None:
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)


def _rss() -> int | None:
    """Resident set size in bytes (None without /proc)."""
    try:
        with open(f"{_PROC}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss() -> int:
    with open(f"{_PROC}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{_PROC}/status has no VmHWM line")


def reset_peak_rss() -> bool:
    """Set the kernel's peak RSS of this process to its current RSS; False where refused."""
    try:
        with open(f"{_PROC}/clear_refs", "w") as f:
            f.write("5")
        _peak_rss()
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's where it is glibc
    except (OSError, AttributeError):
        pass


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="dloral-rss-sampler", daemon=True)
        self.done = threading.Event()
        self.peak = _rss() or 0

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.peak = max(self.peak, _rss() or 0)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, _rss() or 0)


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes`: the peak increase in memory in
    use during the block over the start (None: not measurable here); `m.kind` says how."""

    def __init__(self, device: torch.device, reset_rss: bool = True) -> None:
        self.device = device
        self.reset_rss = reset_rss  # False: sample the RSS instead of resetting its peak
        self.peak_bytes: int | None = None
        self._base = 0
        self._sampler: _Sampler | None = None
        self._reset = False
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = (
                "CUDA allocator peak during its timed passes over the allocation as they started "
                "(peak reset per method)"
            )
            return self
        _trim_heap()
        base = _rss()
        if base is None:
            self.kind = "not measured: no /proc on this system"
            return self
        self._base = base
        self._reset = self.reset_rss and reset_peak_rss()
        if self._reset:
            self.kind = "peak RSS during its timed passes over the RSS as they started"
            self.kind += " (Linux VmHWM reset per method)"
        else:
            self.kind = "peak RSS during its timed passes over the RSS as they started"
            self.kind += f" (sampled every {SAMPLE_S * 1e3:g} ms)"
            self._sampler = _Sampler()
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._sampler is not None:
            self.peak_bytes = max(self._sampler.stop() - self._base, 0)
        elif self._reset:
            self.peak_bytes = max(_peak_rss() - self._base, 0)
