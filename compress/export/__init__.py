"""Exports for serving runtimes, one module per format, each checked in the runtime that serves it.

- `onnx`: ONNX Runtime: classifiers (fp32 graph, ORT graph optimisations, int8 dynamic) and causal LMs
  (fp32 or int4 weight-only MatMulNBits, `onnx_lm`).
- `compressed-tensors`: transformers / vLLM: W8A8 int8, W4A16, sparse bitmask.
- `gguf`: llama.cpp (llama.cpp's converter and quantizer; perplexity and speed in llama.cpp).

`problems()` refuses what cannot work before any work. The export stage's per-format configs and
handlers are in `formats/` (registered in `config.EXPORT_FORMATS`).
"""

from __future__ import annotations

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
        archs = list(getattr(getattr(bundle.model, "config", None), "architectures", None) or [])
        found.extend(f"{field}: {why}" for why in gguf_problems(bundle.format, archs))
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


def gguf_problems(bundle_format: str, architectures: list[str]) -> list[str]:
    """Why a model of `bundle_format` and `architectures` cannot go to GGUF here: llama.cpp's tools not
    built, an architecture its converter does not know, or a format with no plain float form. Cheap:
    file reads only."""
    from compress.export.gguf_float import format_problem
    from compress.export.llama_cpp import converter_architectures, find_tools, missing_tools_message

    found = []
    tools = find_tools()
    if tools is None:
        found.append(missing_tools_message())
    elif architectures and not set(architectures) & converter_architectures(tools):
        found.append(f"llama.cpp's converter does not support {', '.join(architectures)}; gguf export is for the "
                     f"architectures it registers (Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, ...)")
    why = format_problem(bundle_format)
    return found + ([f"gguf export: {why}"] if why else [])


__all__ = ["EXTRA", "FORMATS", "gguf_problems", "missing_runtime", "problems"]
