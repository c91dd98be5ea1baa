"""The peak memory of a step: what ``compare`` reports beside each method's seconds."""

from __future__ import annotations

import re
import resource
import sys

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """The peak memory of the code run inside ``with PeakMemory(device) as peak:``, in MiB, above what was held before.

    On the CPU, the process's resident high-water mark (``VmHWM``), reset on entry where Linux
    allows it (``/proc/self/clear_refs``); where it does not, the lifetime peak, which only
    bounds the step's from above. On a CUDA device, the peak of memory allocated by tensors
    (:func:`torch.cuda.max_memory_allocated`, reset on entry) as well.

    Args:
        device: where the step runs (default: the CPU).

    Example:
        >>> with PeakMemory() as peak:
        ...     block = torch.ones(2**22)  # 16 MiB
        >>> peak.cpu_mb >= 0 and peak.as_dict().keys() == {"peak_mb"}
        True
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.cpu_mb = float("nan")
        self.cuda_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        self._start = _resident_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device) / 2**20
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_mb = max(_high_water_mb() - self._start, 0.0)
        if self.device.type == "cuda":
            self.cuda_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._cuda_start

    def as_dict(self) -> dict[str, float]:
        """``{"peak_mb": ...}``, and ``"cuda_peak_mb"`` on a CUDA device."""
        return {"peak_mb": self.cpu_mb, **({} if self.cuda_mb is None else {"cuda_peak_mb": self.cuda_mb})}


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            found = re.search(rf"{field}:\s+(\d+)", fh.read())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def _lifetime_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)  # bytes there


def _resident_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else _lifetime_peak_mb()


def _high_water_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else _lifetime_peak_mb()
