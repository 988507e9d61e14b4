"""One line naming the machine (CPU or GPU model, cores, threads, versions) for the header of a results file."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_model", "machine_line"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line(device: torch.device | str | None = None) -> str:
    """One line naming the device, cores, torch threads and versions, for the header of a results file."""
    device = torch.device(device or "cpu")
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return (f"{dev}; nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
