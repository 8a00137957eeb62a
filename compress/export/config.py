"""The export stage's config family: the fields every format shares, and the registry of formats.

Each format (compress/export/formats/) is a subclass of `Export` that narrows `format` to its own
name, adds only its own fields and registers a handler with `EXPORT_FORMATS.register(...)`. The
recipe validates an export stage as a union over the formats, so a recipe stays flat YAML
(`type: export, format: gguf, llama_quantize: Q4_K_M`) and a field of another format is refused
naming the format it belongs to. A leaf module (it imports no format), so the formats and the stage
import it without a cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress.methods import FamilyConfig, MethodFamily
from compress.registry import StageConfig

FACTS_FILE = "export.json"


class Export(FamilyConfig):
    """Write the model for a serving runtime (onnx, compressed-tensors, gguf) and check it there (terminal)."""

    type: Literal["export"] = "export"
    format: str = Field(..., description=(
        "onnx: ONNX Runtime (classifiers: int8 dynamic; causal LMs: int4 MatMulNBits). compressed-tensors: "
        "transformers/vLLM (W8A8 from int8-dynamic, W4A16 from int4-weight/gptq, float otherwise). gguf: "
        "llama.cpp (causal LMs; llama.cpp's converter, checked with llama-perplexity; build its tools once "
        "with `python -m compress.export.llama_cpp build`). Each format takes its own fields (see "
        "`compress stages`)."))
    eval_samples: int = Field(1000, gt=0, description="Held-out rows the export is checked on.")

    # ------------------------------------------------------------------ what a format overrides

    def format_problems(self, bundle: Any) -> list[str]:
        """This format's own refusals for `bundle` (a field that does not fit the model), each naming
        the field and the fix. Cheap: no model work. The task, runtime and layout checks shared by
        every format are in `compress.export.problems`."""
        return []

    def loading(self, task: str, facts: dict[str, Any]) -> tuple[str, str]:
        """(install line, Python snippet) of `HOW_TO_LOAD.md` for this format's runtime."""
        raise NotImplementedError


EXPORT_FORMATS = MethodFamily(Export, "format")


def how_to_load(config: Export, task: str, facts: dict[str, Any]) -> str:
    """The `HOW_TO_LOAD.md` text: install line and a run snippet for the format's runtime."""
    install, snippet = config.loading(task, facts)
    return (f"# Loading this {config.format} export\n\nNo compress needed:\n\n```\n{install}\n```\n\n"
            f"From this folder:\n\n```python\n{snippet}```\n\nThe runtime check's numbers are in `{FACTS_FILE}`.\n")


def export_label(config: StageConfig) -> str:
    """The folder name under `exports/`: the stage's name, else its format."""
    return config.name or str(getattr(config, "format", "export"))


def export_folder(output_dir: Path, config: Export) -> Path:
    return Path(output_dir) / "exports" / export_label(config)
