"""`format: onnx`: ONNX Runtime. Classifiers: fp32 or int8 dynamic (ORT's transformer fusions);
causal LMs: fp32 or int4 weight-only MatMulNBits, checked by perplexity in ORT."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress.context import RunContext
from compress.errors import StageError
from compress.export.config import EXPORT_FORMATS, Export

# Fields that mean something for one task only; set for the other they are a mistake (named at check time).
CLASSIFIER_ONLY = ("per_channel", "optimize", "max_accuracy_drop", "min_agreement")
LM_ONLY = ("block_size", "symmetric", "int4_algorithm", "max_ppl_diff", "ppl_ctx", "ppl_chunks")
# quantize mode -> the tasks it is offered for, and what to use instead.
MODES = {"int8": ("sequence-classification",), "int4": ("causal-lm",), "none": ("sequence-classification", "causal-lm")}
DEFAULT_MODE = {"sequence-classification": "int8", "causal-lm": "int4"}


class ExportOnnx(Export):
    """ONNX for ONNX Runtime: classifiers fp32 / int8 dynamic, causal LMs fp32 / int4 MatMulNBits."""

    format: Literal["onnx"] = "onnx"
    quantize: Literal["int8", "int4", "none"] | None = Field(None, description=(
        "int8: ORT dynamic int8 (classifiers); int4: ORT's MatMulNBits, 4-bit weight-only in blocks (causal "
        "LMs); none: the fp32 graph. Default: int8 for classifiers, int4 for causal LMs."))
    max_rel_logit_diff: float | None = Field(None, ge=0, description=(
        "Largest logit difference of the fp32 graph from the PyTorch model, relative to the largest logit "
        "(checked before quantizing). Default 1e-4."))
    per_channel: bool = Field(True, description="Classifiers, int8: one scale per output channel (more accurate).")
    optimize: bool = Field(True, description="Classifiers: apply ONNX Runtime's transformer graph fusions (causal "
                                             "LMs get ORT's online graph optimisations when the session starts).")
    max_accuracy_drop: float = Field(1.0, ge=0, description="Classifiers, int8: held-out accuracy may drop at most "
                                                            "this many points below the PyTorch model's.")
    min_agreement: float = Field(0.95, ge=0, le=1, description="Classifiers, int8: share of held-out rows whose "
                                                               "top-1 prediction must match PyTorch's.")
    block_size: int = Field(32, ge=16, description="Causal LMs, int4: weights per scale along the input dimension "
                                                   "(a power of two, at least 16; smaller is more accurate).")
    symmetric: bool = Field(False, description="Causal LMs, int4 with int4_algorithm rtn: no zero points "
                                               "(scales only).")
    int4_algorithm: Literal["hqq", "rtn"] = Field("hqq", description=(
        "Causal LMs, int4 from a float model: how ONNX Runtime's quantizer picks each block's scale and zero "
        "point. hqq fits them to the weights (SmolLM2-135M, block 32: perplexity +0.06%) but stores float zero "
        "points, which ORT's MatMulNBits runs on a slower path (decode 5.1 vs 38.2 tokens/s for rtn there, side "
        "by side); rtn rounds to the nearest level (+25.8% there, refused at the default max_ppl_diff). "
        "compress's own int4 codes (gptq, awq, int4-weight) are written as they are, with integer zero points."))
    max_ppl_diff: float | None = Field(None, ge=0, description=(
        "Causal LMs: largest relative difference between ORT's perplexity of the graph and PyTorch's of the "
        "model on the same held-out tokens. Default: 0.001 for none, 0.10 for int4."))
    ppl_ctx: int = Field(128, ge=8, description="Causal LMs: tokens per perplexity chunk.")
    ppl_chunks: int = Field(16, gt=0, description="Causal LMs: at most this many chunks are scored.")
    seq_len: int = Field(64, gt=1, description="Sequence length of the latency measurement.")
    repeats: int = Field(10, gt=0, description="Timed rounds at batch 1 (classifiers: a third of them at batch 32).")

    def mode(self, task: str) -> str:
        """The quantize mode for a model of `task` (the field, else the task's default)."""
        return self.quantize or DEFAULT_MODE.get(task, "none")

    def format_problems(self, bundle: Any) -> list[str]:
        task, mode = bundle.task, self.mode(bundle.task)
        if task not in DEFAULT_MODE:
            return []  # refused by the task check shared by every format
        found = []
        if task not in MODES[mode]:
            fits = [m for m, tasks in MODES.items() if task in tasks]
            why = ("ONNX Runtime's dynamic int8 path is checked here for classifiers only" if mode == "int8" else
                   "the MatMulNBits path is checked here for causal LMs only (ORT's encoder fusions turn the "
                   "attention MatMuls into fused ops it cannot quantize)")
            found.append(f"quantize: {mode} is not offered for {task} models ({why}); use quantize "
                         f"{' or '.join(fits)}")
        wrong_task = LM_ONLY if task == "sequence-classification" else CLASSIFIER_ONLY
        owner = "causal LMs" if task == "sequence-classification" else "classifiers"
        found += [f"{name}: applies to {owner} only (this model is {task}); remove it"
                  for name in wrong_task if name in self.model_fields_set]
        if "block_size" in self.model_fields_set and self.block_size & (self.block_size - 1):
            found.append(f"block_size: {self.block_size} is not a power of two (MatMulNBits needs one); use 32 or 64")
        for name in ("block_size", "symmetric", "int4_algorithm") if task == "causal-lm" and mode != "int4" else ():
            if name in self.model_fields_set:
                found.append(f"{name}: only used with quantize: int4; remove it")
        if task == "causal-lm" and mode == "int4" and self.symmetric and self.int4_algorithm == "hqq":
            found.append("symmetric: HQQ fits a zero point per block, so it has no symmetric form; set "
                         "int4_algorithm: rtn, or remove symmetric")
        return found

    def loading(self, task: str, facts: dict[str, Any]) -> tuple[str, str]:
        if task == "causal-lm" and facts.get("kv_cache"):
            from compress.export.onnx_lm import HOW_TO_LOAD_KV as HOW_TO_LOAD
        elif task == "causal-lm":
            from compress.export.onnx_lm import HOW_TO_LOAD
        else:
            from compress.export.onnx import HOW_TO_LOAD
        return "pip install onnxruntime transformers", HOW_TO_LOAD.format(folder=".")


def export_onnx(bundle: Any, config: ExportOnnx, ctx: RunContext, folder: Path) -> dict[str, Any]:
    """Write the graph for the model's task and check it in ONNX Runtime; returns the facts."""
    data = ctx.require_data("export")
    if bundle.task == "causal-lm":
        from compress.export.gguf import eval_text
        from compress.export.onnx_lm import OnnxLmOptions, export_onnx_lm

        text = eval_text(data, config.eval_samples)
        if not text:
            raise StageError("export: the held-out split has no text; set data.eval_size")
        options = OnnxLmOptions(quantize=config.mode(bundle.task), block_size=config.block_size,
                                symmetric=config.symmetric, int4_algorithm=config.int4_algorithm,
                                max_ppl_diff=config.max_ppl_diff,
                                ppl_ctx=config.ppl_ctx, ppl_chunks=config.ppl_chunks, seq_len=config.seq_len,
                                repeats=config.repeats)
        if config.max_rel_logit_diff is not None:
            options.max_rel_logit_diff = config.max_rel_logit_diff
        return export_onnx_lm(bundle.model, bundle.tokenizer, folder, text, options, ctx.logger)

    from compress.export.measure import heldout_batches
    from compress.export.onnx import OnnxOptions
    from compress.export.onnx import export_onnx as write_and_check

    batches = heldout_batches(data, bundle.tokenizer, config.eval_samples, batch_size=32)
    if not batches:
        raise StageError("export: the held-out split is empty; set data.eval_size")
    options = OnnxOptions(quantize=config.mode(bundle.task), per_channel=config.per_channel,
                          optimize=config.optimize, max_accuracy_drop=config.max_accuracy_drop,
                          min_agreement=config.min_agreement, seq_len=config.seq_len, repeats=config.repeats)
    if config.max_rel_logit_diff is not None:
        options.max_rel_logit_diff = config.max_rel_logit_diff
    return write_and_check(bundle.model, bundle.tokenizer, folder, batches, options, ctx.logger)


EXPORT_FORMATS.register(ExportOnnx, export_onnx)
