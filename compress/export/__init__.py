"""Exports for serving runtimes, one module per format, each checked in the runtime that serves it.

- `onnx`: ONNX Runtime (CPU classifiers): fp32 graph, ORT graph optimisations, int8 dynamic.
- `compressed-tensors`: transformers / vLLM: W8A8 int8, W4A16, sparse bitmask.
- `gguf`: llama.cpp (not written yet; refused with that reason).

`problems()` refuses what cannot work before any work; `export_bundle()` writes and checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.export.runtime import EXTRA, missing_runtime, task_problem

FORMATS = ("onnx", "compressed-tensors", "gguf")


def problems(bundle: Any, fmt: str, field: str = "format") -> list[str]:
    """Why `bundle` cannot be exported to `fmt` here (empty: it can). Cheap: no model work."""
    found = []
    why = task_problem(fmt, bundle.task)
    if why:
        found.append(f"{field}: {why}")
    if fmt == "gguf":
        found.append(f"{field}: gguf export is not implemented in this version of compress yet; use onnx or "
                     f"compressed-tensors")
    why = missing_runtime(fmt)
    if why:
        found.append(f"{field}: {why}")
    if fmt == "compressed-tensors":
        from compress.export.compressed import layout_problem

        why = layout_problem(bundle)
        if why:
            found.append(f"{field}: {why}")
    if fmt == "onnx" and bundle.format not in ("hf", "quantized", "lowrank"):
        found.append(f"{field}: onnx export takes a float, low-rank or compress-quantized model, this one is "
                     f"{bundle.format!r}; export the model before that stage")
    return found


def export_bundle(bundle: Any, fmt: str, folder: Path, batches: list[dict[str, Any]], options: Any,
                  logger: Any) -> dict[str, Any]:
    """Write `bundle` as `fmt` into `folder` (which must exist) and check it in its runtime."""
    if fmt == "onnx":
        from compress.export.onnx import export_onnx

        return export_onnx(bundle.model, bundle.tokenizer, folder, batches, options, logger)
    if fmt == "compressed-tensors":
        from compress.export.compressed import export_compressed

        return export_compressed(bundle, folder, batches, options, logger)
    raise ValueError(f"unknown export format {fmt!r}")


__all__ = ["EXTRA", "FORMATS", "export_bundle", "missing_runtime", "problems"]
