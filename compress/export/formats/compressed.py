"""`format: compressed-tensors`: transformers / vLLM, checked by reloading in plain transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress.context import RunContext
from compress.errors import StageError
from compress.export.config import EXPORT_FORMATS, Export

AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}


class ExportCompressedTensors(Export):
    """compressed-tensors: W8A8 from int8-dynamic, W4A16 from int4-weight / GPTQ, sparse bitmask, float."""

    format: Literal["compressed-tensors"] = "compressed-tensors"
    max_rel_logit_diff: float | None = Field(None, ge=0, description=(
        "Largest logit difference of the reloaded model from compress's, relative to the largest logit. "
        "Default: weight-only 1e-5, W8A8 0.05 (activation rounding differs)."))

    def loading(self, task: str, facts: dict[str, Any]) -> tuple[str, str]:
        from compress.export.compressed import HOW_TO_LOAD

        return "pip install compressed-tensors transformers", HOW_TO_LOAD.format(auto=AUTO_CLASSES[task], folder=".")


def export_compressed_tensors(bundle: Any, config: ExportCompressedTensors, ctx: RunContext,
                              folder: Path) -> dict[str, Any]:
    """Write and reload-check the compressed-tensors folder; returns the facts."""
    from compress.export.compressed import export_compressed
    from compress.export.measure import heldout_batches

    batches = heldout_batches(ctx.require_data("export"), bundle.tokenizer, _limit(bundle, config),
                              batch_size=32 if bundle.task == "sequence-classification" else 8)
    if not batches:
        raise StageError("export: the held-out split is empty; set data.eval_size")
    return export_compressed(bundle, folder, batches, config, ctx.logger)


def _limit(bundle: Any, config: Export) -> int:
    # Causal LMs are checked on fewer rows: each row is a full sequence of logits over the vocabulary.
    return config.eval_samples if bundle.task == "sequence-classification" else min(config.eval_samples, 64)


EXPORT_FORMATS.register(ExportCompressedTensors, export_compressed_tensors)
