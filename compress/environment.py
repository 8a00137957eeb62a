"""What a run ran on: library versions and hardware, for run.json and the report."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from compress.report.schema import Environment

PACKAGES = ("compress", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
            "safetensors", "pydantic", "torchao", "huggingface_hub")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def collect_environment() -> Environment:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Environment(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=_cpu_name(),
        cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        gpu=gpu,
        versions={name: _version(name) for name in PACKAGES},
    )
