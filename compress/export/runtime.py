"""Which serving runtime each export format needs, and a refusal that names how to install it.

The runtimes are an optional extra (`pip install 'compress-hf[export]'`), so they are looked up by
import name here, before any work, instead of failing half-way through an export.
"""

from __future__ import annotations

import importlib.util

from compress import DISTRIBUTION

EXTRA = f"pip install '{DISTRIBUTION}[export]'"

# format -> the Python modules its exporter and its runtime check import.
RUNTIME_MODULES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "compressed-tensors": ("compressed_tensors",),
    "gguf": ("gguf",),
}

# format -> tasks it can serve (checked before any work).
FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "onnx": ("sequence-classification", "causal-lm"),
    "compressed-tensors": ("sequence-classification", "causal-lm"),
    "gguf": ("causal-lm",),
}


def missing_runtime(fmt: str) -> str | None:
    """None when every module `fmt` needs imports here, else one line naming them and the install."""
    missing = [name for name in RUNTIME_MODULES[fmt] if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"the {fmt} export needs {', '.join(missing)}, which this Python does not have; "
            f"install the export runtimes with: {EXTRA}")


def task_problem(fmt: str, task: str) -> str | None:
    """None when `fmt` serves `task`, else one line saying which formats do."""
    if task in FORMAT_TASKS[fmt]:
        return None
    fits = [f for f, tasks in FORMAT_TASKS.items() if task in tasks]
    return (f"{fmt} export is for {' and '.join(FORMAT_TASKS[fmt])} models, this one is {task}; "
            f"use format {' or '.join(fits) or '(none yet)'}")
