"""`format: gguf`: llama.cpp's converter (and llama-quantize), checked with llama.cpp's perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from compress.context import RunContext
from compress.errors import StageError
from compress.export.config import EXPORT_FORMATS, Export

# The llama-quantize types offered (llama.cpp's names); kept here so the recipe check needs no import.
GGUF_QUANT_TYPES = Literal["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                           "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"]


class ExportGguf(Export):
    """GGUF for llama.cpp / Ollama (causal LMs): F16, Q8_0, or any llama-quantize type such as Q4_K_M."""

    format: Literal["gguf"] = "gguf"
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description=(
        "The type llama.cpp's convert_hf_to_gguf.py writes (2-D weights; norms stay f32). Not used with "
        "llama_quantize (the converter then writes f32 for llama-quantize)."))
    llama_quantize: GGUF_QUANT_TYPES | None = Field(None, description=(
        "Quantize the converted file with llama.cpp's llama-quantize to this type (e.g. Q4_K_M, Q8_0, "
        "Q4_0); the file is named model-<type>.gguf."))
    max_ppl_diff: float | None = Field(None, ge=0, description=(
        "Largest relative difference between llama.cpp's perplexity of the file and PyTorch's of the model "
        "on the same held-out tokens. Default: 0.02 for f32/f16/bf16/q8_0, 0.05 for Q4_K/Q5/Q6/IQ4 types, "
        "0.08 for Q4_0/Q4_1, 0.15 below 4 bits."))
    ppl_ctx: int = Field(128, ge=8, description="Tokens per perplexity chunk (llama-perplexity -c); the held-out "
                                                "text must hold at least two chunks.")
    ppl_chunks: int = Field(16, gt=0, description="At most this many chunks are scored.")
    prompt_tokens: int = Field(128, gt=0, description="Prompt length of the prefill speed test (llama-bench -p).")
    decode_tokens: int = Field(32, gt=0, description="Tokens generated in the decode speed test (llama-bench -n; "
                                                     "PyTorch greedy with KV cache).")
    bench_rounds: int = Field(3, gt=0, description="Interleaved llama.cpp / PyTorch speed rounds (median).")

    @model_validator(mode="after")
    def _one_type(self) -> ExportGguf:
        if self.llama_quantize is not None and "outtype" in self.model_fields_set:
            raise ValueError(f"outtype: not used with llama_quantize {self.llama_quantize} (the converter writes "
                             f"f32 for llama-quantize); drop one of them")
        return self

    def loading(self, task: str, facts: dict[str, Any]) -> tuple[str, str]:
        from compress.export.gguf import HOW_TO_LOAD

        return "pip install llama-cpp-python  # or llama.cpp's own tools", HOW_TO_LOAD.format(file=facts["file"])


def export_gguf(bundle: Any, config: ExportGguf, ctx: RunContext, folder: Path) -> dict[str, Any]:
    """Convert (and quantize) with llama.cpp's tools and check perplexity and speed there; returns the facts."""
    from compress.export.gguf import GgufOptions, eval_text
    from compress.export.gguf import export_gguf as write_and_check

    text = eval_text(ctx.require_data("export"), config.eval_samples)
    if not text:
        raise StageError("export: the held-out split has no text; set data.eval_size")
    options = GgufOptions(outtype=config.outtype, llama_quantize=config.llama_quantize,
                          max_ppl_diff=config.max_ppl_diff, ppl_ctx=config.ppl_ctx, ppl_chunks=config.ppl_chunks,
                          prompt_tokens=config.prompt_tokens, decode_tokens=config.decode_tokens,
                          bench_rounds=config.bench_rounds)
    return write_and_check(bundle, folder, text, options, ctx.logger)


EXPORT_FORMATS.register(ExportGguf, export_gguf)
