"""Peak memory of one training step, the same way on both sides of a benchmark: CUDA's peak allocated bytes on a
GPU; on a CPU the process's peak resident set (VmHWM), which writing "5" to /proc/self/clear_refs resets to the
current resident set."""

from __future__ import annotations

import json
import os


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def current_bytes(device) -> int:
    """What the process holds now: CUDA's allocated bytes, or the resident set on a CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def append_record(path: str, record: dict) -> None:
    """One JSON line per event; ranks of a multi-process run append to the same file."""
    with open(path, "a") as handle:
        handle.write(json.dumps({**record, "rank": int(os.environ.get("RANK", "0"))}) + "\n")
