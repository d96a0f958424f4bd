"""Peak memory of a block of work, on CUDA or CPU.

* CUDA (the model's device is a GPU): ``torch.cuda.max_memory_allocated``, reset on entry; kind
  ``"cuda_max_allocated"``.
* CPU on Linux: the process's peak resident set size ``VmHWM`` from ``/proc/self/status``, reset on
  entry by writing ``5`` to ``/proc/self/clear_refs``; kind ``"rss_peak"``. It includes the interpreter and
  the libraries, so compare methods by differences.
* Where the reset is impossible: ``getrusage``'s peak since the process started; kind
  ``"rss_peak_since_start"``. (``tracemalloc`` is not used: it sees Python allocations, not tensors.)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.bytes`` (``None`` if unavailable) and ``mem.kind``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self.kind = "unavailable"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "rss_peak"
        except OSError:
            self.kind = "rss_peak_since_start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self.kind == "rss_peak":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.bytes = int(line.split()[1]) * 1024
            return
        try:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.bytes = int(peak if sys.platform == "darwin" else peak * 1024)
        except (ImportError, OSError):
            self.kind = "unavailable"
