"""What a benchmark ran on: CPU or GPU name, load average, runtime versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def device_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return cpu_description()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def runtime_versions(kind: str) -> dict[str, str]:
    if kind == "onnxruntime":
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}
    return {}
