"""export stage: write the model for a serving runtime and check it in that runtime (terminal).

One or more `export` stages end a recipe. Each writes its artefacts into the run folder under
`exports/<name or format>/` (model file(s), tokenizer, `export.json` with the runtime's numbers,
`HOW_TO_LOAD.md`) and returns the bundle unchanged, so its numbers land in the report beside
PyTorch's. Refusals (wrong task, missing runtime, a layout the format cannot hold) come before any
work, from `check_export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.errors import StageError
from compress.io import atomic_dir, write_json_atomic, write_text_atomic
from compress.registry import StageConfig, StageResult, register_stage

EXPORTS_DIR = "exports"
FACTS_FILE = "export.json"
# Fields that mean something for one format only; set for another format they are a mistake.
_ONLY_FOR = {"quantize": "onnx", "per_channel": "onnx", "optimize": "onnx", "max_accuracy_drop": "onnx",
             "min_agreement": "onnx", "repeats": "onnx", "seq_len": "onnx"}


class Export(StageConfig):
    """Write the model for a serving runtime (onnx, compressed-tensors) and check it there (terminal)."""

    type: Literal["export"] = "export"
    format: Literal["onnx", "compressed-tensors", "gguf"] = Field(..., description=(
        "onnx: ONNX Runtime (classifiers). compressed-tensors: transformers/vLLM (W8A8 from int8-dynamic, "
        "W4A16 from int4-weight/gptq, float otherwise). gguf: llama.cpp (not implemented yet)."))
    quantize: Literal["int8", "none"] = Field("int8", description="onnx: ONNX Runtime dynamic int8, or the fp32 "
                                                                  "graph.")
    per_channel: bool = Field(True, description="onnx int8: one scale per output channel (more accurate).")
    optimize: bool = Field(True, description="onnx: apply ONNX Runtime's transformer graph fusions.")
    max_rel_logit_diff: float | None = Field(None, ge=0, description=(
        "Largest logit difference from the PyTorch model allowed, relative to the largest logit. Default: "
        "onnx fp32 1e-4; compressed-tensors weight-only 1e-5, W8A8 0.05 (activation rounding differs)."))
    max_accuracy_drop: float = Field(1.0, ge=0, description="onnx int8: held-out accuracy may drop at most this "
                                                            "many points below the PyTorch model's.")
    min_agreement: float = Field(0.95, ge=0, le=1, description="onnx int8: share of held-out rows whose top-1 "
                                                               "prediction must match PyTorch's.")
    eval_samples: int = Field(1000, gt=0, description="Held-out rows the export is checked on.")
    seq_len: int = Field(64, gt=1, description="onnx: sequence length of the latency measurement.")
    repeats: int = Field(10, gt=0, description="onnx: timed rounds at batch 1 (a third of them at batch 32).")

    @model_validator(mode="after")
    def _fields_fit_format(self) -> Export:
        wrong = [f"{name} applies to format {fmt} only (this stage exports {self.format})"
                 for name, fmt in _ONLY_FOR.items() if name in self.model_fields_set and self.format != fmt]
        if wrong:
            raise ValueError("; ".join(wrong))
        return self


def check_export(bundle: ModelBundle, config: Export, ctx: RunContext) -> list[str]:
    from compress.export import problems

    found = problems(bundle, config.format)
    if ctx.data is None or not config.eval_samples:
        found.append("export: needs a data section with held-out rows (the export is checked on them)")
    # (That only exports follow an export is the recipe's own check: the stage is registered terminal.)
    if any(e.type == "export" and e.label() == config.label() for e in ctx.earlier):
        found.append(f"export: two export stages would write exports/{config.label()}; give them distinct names")
    return found


def export_folder(output_dir: Path, config: Export) -> Path:
    return Path(output_dir) / EXPORTS_DIR / (config.name or config.format)


def run_export(bundle: ModelBundle, config: Export, ctx: RunContext) -> StageResult:
    from compress.export import export_bundle, problems
    from compress.export.measure import heldout_batches

    found = problems(bundle, config.format)
    if found:
        raise StageError("; ".join(found))
    data = ctx.require_data("export")
    target = ctx.artifact_dir(EXPORTS_DIR, config.name or config.format)
    facts: dict[str, Any]
    # A one-shot stage: under a distributed launch the runner runs it on rank 0 only.
    limit = config.eval_samples if bundle.task == "sequence-classification" else min(config.eval_samples, 64)
    batches = heldout_batches(data, bundle.tokenizer, limit,
                              batch_size=32 if bundle.task == "sequence-classification" else 8)
    if not batches:
        raise StageError("export: the held-out split is empty; set data.eval_size")
    options = _options(config)
    was_training = bundle.model.training
    bundle.model.eval()
    with atomic_dir(target) as tmp:
        facts = export_bundle(bundle, config.format, tmp, batches, options, ctx.logger)
        facts["folder"] = str(target)
        write_json_atomic(tmp / FACTS_FILE, facts)
        write_text_atomic(tmp / "HOW_TO_LOAD.md", how_to_load(config.format, bundle.task, target))
    bundle.model.train(was_training)
    out = bundle.replace()
    out.record("export", config.model_dump(mode="json"), **{k: v for k, v in facts.items()
                                                            if k != "quantization_config"})
    return StageResult(out, facts, [target])


def _options(config: Export) -> Any:
    if config.format == "onnx":
        from compress.export.onnx import OnnxOptions

        return OnnxOptions(quantize=config.quantize, per_channel=config.per_channel, optimize=config.optimize,
                           max_rel_logit_diff=config.max_rel_logit_diff if config.max_rel_logit_diff is not None
                           else OnnxOptions.max_rel_logit_diff,
                           max_accuracy_drop=config.max_accuracy_drop, min_agreement=config.min_agreement,
                           seq_len=config.seq_len, repeats=config.repeats)
    return config


def how_to_load(fmt: str, task: str, folder: Path) -> str:
    """The `HOW_TO_LOAD.md` text: install line and a run snippet for the runtime."""
    auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}[task]
    if fmt == "onnx":
        from compress.export.onnx import HOW_TO_LOAD

        install, snippet = "pip install onnxruntime transformers", HOW_TO_LOAD.format(folder=".")
    else:
        from compress.export.compressed import HOW_TO_LOAD

        install, snippet = "pip install compressed-tensors transformers", HOW_TO_LOAD.format(auto=auto, folder=".")
    return (f"# Loading this {fmt} export\n\nNo compress needed:\n\n```\n{install}\n```\n\nFrom this folder:\n\n"
            f"```python\n{snippet}```\n\nThe runtime check's numbers are in `{FACTS_FILE}`.\n")


register_stage(Export, run_export, check=check_export, terminal=True)

__all__ = ["Export", "check_export", "export_folder", "run_export"]
