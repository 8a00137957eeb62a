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
             "min_agreement": "onnx", "repeats": "onnx", "seq_len": "onnx", "outtype": "gguf",
             "llama_quantize": "gguf", "max_ppl_diff": "gguf", "ppl_ctx": "gguf", "ppl_chunks": "gguf",
             "prompt_tokens": "gguf", "decode_tokens": "gguf", "bench_rounds": "gguf"}
# The llama-quantize types offered (llama.cpp's names); kept here so the recipe check needs no import.
GGUF_QUANT_TYPES = Literal["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                           "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"]


class Export(StageConfig):
    """Write the model for a serving runtime (onnx, compressed-tensors, gguf) and check it there (terminal)."""

    type: Literal["export"] = "export"
    format: Literal["onnx", "compressed-tensors", "gguf"] = Field(..., description=(
        "onnx: ONNX Runtime (classifiers). compressed-tensors: transformers/vLLM (W8A8 from int8-dynamic, "
        "W4A16 from int4-weight/gptq, float otherwise). gguf: llama.cpp (causal LMs; llama.cpp's converter, "
        "checked with llama-perplexity; build its tools once with `python -m compress.export.llama_cpp build`)."))
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
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description=(
        "gguf: the type llama.cpp's convert_hf_to_gguf.py writes (2-D weights; norms stay f32). Ignored when "
        "llama_quantize is set (the converter then writes f32 for llama-quantize)."))
    llama_quantize: GGUF_QUANT_TYPES | None = Field(None, description=(
        "gguf: quantize the converted file with llama.cpp's llama-quantize to this type (e.g. Q4_K_M, Q8_0, "
        "Q4_0); the file is named model-<type>.gguf."))
    max_ppl_diff: float | None = Field(None, ge=0, description=(
        "gguf: largest relative difference between llama.cpp's perplexity of the file and PyTorch's of the model "
        "on the same held-out tokens. Default: 0.02 for f32/f16/bf16/q8_0, 0.05 for Q4_K/Q5/Q6/IQ4 types, 0.08 "
        "for Q4_0/Q4_1, 0.15 below 4 bits."))
    ppl_ctx: int = Field(128, ge=8, description="gguf: tokens per perplexity chunk (llama-perplexity -c); the "
                                                "held-out text must hold at least two chunks.")
    ppl_chunks: int = Field(16, gt=0, description="gguf: at most this many chunks are scored.")
    prompt_tokens: int = Field(128, gt=0, description="gguf: prompt length of the prefill speed test "
                                                      "(llama-bench -p).")
    decode_tokens: int = Field(32, gt=0, description="gguf: tokens generated in the decode speed test "
                                                     "(llama-bench -n; PyTorch greedy with KV cache).")
    bench_rounds: int = Field(3, gt=0, description="gguf: interleaved llama.cpp / PyTorch speed rounds (median).")

    @model_validator(mode="after")
    def _fields_fit_format(self) -> Export:
        wrong = [f"{name} applies to format {fmt} only (this stage exports {self.format})"
                 for name, fmt in _ONLY_FOR.items() if name in self.model_fields_set and self.format != fmt]
        if self.llama_quantize is not None and "outtype" in self.model_fields_set:
            wrong.append(f"outtype: not used with llama_quantize {self.llama_quantize} (the converter writes f32 for "
                         f"llama-quantize); drop one of them")
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
    if config.format == "gguf":
        return _run_gguf(bundle, config, ctx, data, target)
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


def _run_gguf(bundle: ModelBundle, config: Export, ctx: RunContext, data: Any, target: Path) -> StageResult:
    from compress.export import export_bundle
    from compress.export.gguf import eval_text

    text = eval_text(data, config.eval_samples)
    if not text:
        raise StageError("export: the held-out split has no text; set data.eval_size")
    was_training = bundle.model.training
    bundle.model.eval()
    with atomic_dir(target) as tmp:
        facts = export_bundle(bundle, "gguf", tmp, text, _options(config), ctx.logger)
        facts["folder"] = str(target)
        write_json_atomic(tmp / FACTS_FILE, facts)
        write_text_atomic(tmp / "HOW_TO_LOAD.md", how_to_load("gguf", bundle.task, target, facts["file"]))
    bundle.model.train(was_training)
    out = bundle.replace()
    out.record("export", config.model_dump(mode="json"), **facts)
    return StageResult(out, facts, [target])


def _options(config: Export) -> Any:
    if config.format == "onnx":
        from compress.export.onnx import OnnxOptions

        return OnnxOptions(quantize=config.quantize, per_channel=config.per_channel, optimize=config.optimize,
                           max_rel_logit_diff=config.max_rel_logit_diff if config.max_rel_logit_diff is not None
                           else OnnxOptions.max_rel_logit_diff,
                           max_accuracy_drop=config.max_accuracy_drop, min_agreement=config.min_agreement,
                           seq_len=config.seq_len, repeats=config.repeats)
    if config.format == "gguf":
        from compress.export.gguf import GgufOptions

        return GgufOptions(outtype=config.outtype, llama_quantize=config.llama_quantize,
                           max_ppl_diff=config.max_ppl_diff, ppl_ctx=config.ppl_ctx, ppl_chunks=config.ppl_chunks,
                           prompt_tokens=config.prompt_tokens, decode_tokens=config.decode_tokens,
                           bench_rounds=config.bench_rounds)
    return config


def how_to_load(fmt: str, task: str, folder: Path, file: str = "") -> str:
    """The `HOW_TO_LOAD.md` text: install line and a run snippet for the runtime."""
    auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}[task]
    if fmt == "gguf":
        from compress.export.gguf import HOW_TO_LOAD

        install, snippet = "pip install llama-cpp-python  # or llama.cpp's own tools", HOW_TO_LOAD.format(file=file)
    elif fmt == "onnx":
        from compress.export.onnx import HOW_TO_LOAD

        install, snippet = "pip install onnxruntime transformers", HOW_TO_LOAD.format(folder=".")
    else:
        from compress.export.compressed import HOW_TO_LOAD

        install, snippet = "pip install compressed-tensors transformers", HOW_TO_LOAD.format(auto=auto, folder=".")
    return (f"# Loading this {fmt} export\n\nNo compress needed:\n\n```\n{install}\n```\n\nFrom this folder:\n\n"
            f"```python\n{snippet}```\n\nThe runtime check's numbers are in `{FACTS_FILE}`.\n")


register_stage(Export, run_export, check=check_export, terminal=True)

__all__ = ["Export", "check_export", "export_folder", "run_export"]
