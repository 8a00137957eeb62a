"""GGUF export for llama.cpp, checked in llama.cpp itself.

Path: the model as a plain float Hugging Face folder (compress's own quantized / low-rank layers
dequantized, see `gguf_float`) -> llama.cpp's `convert_hf_to_gguf.py` (its own conversion rules and
tokenizer handling) at `outtype` -> optionally `llama-quantize` to a llama.cpp type (Q4_K_M, ...).

The check: `llama-perplexity` on the run's held-out text, and PyTorch's perplexity of the model
being exported computed the same way on the very same tokens (`llama-tokenize`'s ids; chunks of
`ppl_ctx` tokens, the first replaced by BOS when the vocabulary adds one, the second half of each
chunk scored, as llama-perplexity does). They must agree within `max_ppl_diff` (relative), else
StageError. Pruned zeros must survive in tensor types that can hold exact zeros (f32, f16, bf16,
q8_0), read back from the file with the `gguf` reader. Speed: llama-bench prompt and decode
tokens/s beside PyTorch's, in interleaved rounds.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import StageError
from compress.export import llama_run
from compress.export.gguf_float import write_float_folder
from compress.export.llama_cpp import find_tools, missing_tools_message

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama-quantize types offered (llama.cpp's names); the ones llama.cpp recommends for CPUs first.
QUANT_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
               "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K", "IQ4_NL", "IQ4_XS", "F16", "BF16")
# Default perplexity tolerance (relative to PyTorch's): 16/32-bit and 8-bit types change the
# weights by < 0.5% of a block's largest value, so 2% catches a wrong tensor and not the rounding;
# 4-6-bit types move a small LM's perplexity by a few percent (issue #21: Q4_K_M within 5%); 2-3-bit more.
PPL_TOLERANCE = {"f32": 0.02, "f16": 0.02, "bf16": 0.02, "q8_0": 0.02, "F16": 0.02, "BF16": 0.02, "Q8_0": 0.02,
                 "Q6_K": 0.05, "Q5_K_M": 0.05, "Q5_K_S": 0.05, "Q5_0": 0.05, "Q5_1": 0.05, "Q4_K_M": 0.05,
                 "Q4_K_S": 0.05, "Q4_0": 0.08, "Q4_1": 0.08, "IQ4_NL": 0.05, "IQ4_XS": 0.05}
LOW_BIT_TOLERANCE = 0.15
# Tensor types that store an exact 0 as 0 (pruned zeros survive); k-quants and Q4_1/Q5_1 store
# affine blocks (scale and minimum) whose 0 comes back as a small nonzero.
KEEPS_ZEROS = ("F32", "F16", "BF16", "Q8_0")


@dataclass
class GgufOptions:
    """What to write and how strictly to check it (see the export stage's fields)."""

    outtype: str = "f16"
    llama_quantize: str | None = None
    max_ppl_diff: float | None = None
    ppl_ctx: int = 128
    ppl_chunks: int = 16
    prompt_tokens: int = 128
    decode_tokens: int = 32
    bench_rounds: int = 3
    threads: int | None = None

    @property
    def type_label(self) -> str:
        return self.llama_quantize or self.outtype

    @property
    def tolerance(self) -> float:
        if self.max_ppl_diff is not None:
            return self.max_ppl_diff
        return PPL_TOLERANCE.get(self.type_label, LOW_BIT_TOLERANCE)


def tools_or_error() -> Any:
    tools = find_tools()
    if tools is None:
        raise StageError(f"gguf export: {missing_tools_message()}")
    return tools


def eval_text(data: Any, limit: int | None) -> str:
    """The held-out split's text (the rows the run evaluates), rows separated by blank lines."""
    spec, rows = data.spec, data.eval
    if limit is not None and len(rows) > limit:
        rows = rows.select(range(limit))
    if spec.prompt_column and spec.prompt_column in rows.column_names:
        texts = [f"{p}{c}" for p, c in zip(rows[spec.prompt_column], rows[spec.completion_column], strict=True)]
    else:
        texts = list(rows[spec.text_column])
    return "\n\n".join(t.strip() for t in texts if t and t.strip())


@torch.inference_mode()
def torch_perplexity(model: Any, tokens: list[int], ctx: int, chunks: int, bos: int | None) -> float:
    """Perplexity as llama-perplexity computes it: chunks of `ctx` tokens, token 0 of each replaced by
    BOS (when the vocabulary adds one), the predictions of tokens ctx/2+1 .. ctx-1 scored."""
    n_chunk = min(chunks, len(tokens) // ctx)
    first = ctx // 2
    device = next(model.parameters()).device
    per_batch = max(1, 2048 // ctx)
    nll, count = 0.0, 0
    for start in range(0, n_chunk, per_batch):
        rows = torch.tensor([tokens[j * ctx:(j + 1) * ctx] for j in range(start, min(n_chunk, start + per_batch))])
        inputs = rows.clone()
        if bos is not None:
            inputs[:, 0] = bos
        logits = model(input_ids=inputs.to(device), use_cache=False).logits[:, first:ctx - 1].float()
        target = rows[:, first + 1:ctx].to(device)
        nll -= float(torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).double().sum())
        count += target.numel()
    return math.exp(nll / count)


@torch.inference_mode()
def torch_speed(model: Any, vocab: int, prompt: int, decode: int) -> dict[str, float]:
    """PyTorch prefill tokens/s (one forward of `prompt` tokens) and greedy decode tokens/s with the KV
    cache (`decode` tokens after a 1-token context, as llama-bench's tg test starts empty)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)
    model(input_ids=ids, use_cache=False)  # warm-up, untimed (llama-bench warms up too)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    prefill = time.perf_counter() - start
    out = model(input_ids=ids[:, :1], use_cache=True)
    start = time.perf_counter()
    for _ in range(decode):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        # transformers 5.24 names the KV cache `cache` (`past_key_values` is deprecated); older ones the latter.
        state = {"cache": out.cache} if getattr(out, "cache", None) is not None else {
            "past_key_values": out.past_key_values}
        out = model(input_ids=token, use_cache=True, **state)
    return {"prefill_tokens_per_s": prompt / prefill, "decode_tokens_per_s": decode / (time.perf_counter() - start)}


def zeros_kept(reader: Any, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """For each pruned tensor: its zero fraction in the GGUF file; StageError when a tensor whose type
    holds exact zeros has fewer zeros than pruning left. (Counted, not located: the converter
    permutes q/k rows for llama.cpp's rotary layout, which moves the zeros but keeps their number.)"""
    import gguf
    from gguf.quants import dequantize

    arch_name = llama_run.gguf_field(reader, "general.architecture")
    blocks = int(llama_run.gguf_field(reader, f"{arch_name}.block_count") or 0)
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    names = gguf.get_tensor_name_map(arch, blocks) if arch is not None else None
    tensors = {t.name: t for t in reader.tensors}
    fractions: dict[str, float] = {}
    unchecked: dict[str, str] = {}
    for key, mask in masks.items():
        gname = names.get_name(key, try_suffixes=(".weight", ".bias")) if names is not None else None
        tensor = tensors.get(gname) if gname else None
        if tensor is None:
            unchecked[key] = "not found in the GGUF file"
            continue
        kind = tensor.tensor_type.name
        if kind not in KEEPS_ZEROS:
            unchecked[key] = f"{kind} stores affine blocks (no exact zeros)"
            continue
        values = dequantize(tensor.data, tensor.tensor_type)
        zeros, pruned = int((values == 0).sum()), int((~mask.bool()).sum())
        if zeros < pruned:
            raise StageError(f"gguf export: tensor {gname} (layer {key}, {kind}) holds {zeros} zeros where pruning "
                             f"left {pruned}: the file does not keep the model's sparsity")
        fractions[key] = round(zeros / values.size, 5)
    return {"pruned_zero_fraction": fractions or None, "zeros_unchecked": unchecked or None}


def bos_to_add(reader: Any) -> int | None:
    """The BOS id llama-perplexity puts at the start of each chunk (None when the vocabulary adds none)."""
    if not llama_run.gguf_field(reader, "tokenizer.ggml.add_bos_token"):
        return None
    bos = llama_run.gguf_field(reader, "tokenizer.ggml.bos_token_id")
    return None if bos is None else int(bos)


def write_gguf(tools: Any, hf_folder: Path, work: Path, out: Path, options: GgufOptions, threads: int) -> None:
    """Convert (and optionally llama-quantize) the float folder into `out`."""
    if options.llama_quantize is None:
        llama_run.convert(tools, hf_folder, out, options.outtype)
        return
    # llama-quantize from f32, so the only rounding is llama.cpp's own quantization.
    source = work / "model-f32.gguf"
    llama_run.convert(tools, hf_folder, source, "f32")
    llama_run.quantize(tools, source, out, options.llama_quantize, threads)
    source.unlink()


def export_gguf(bundle: Any, folder: Path, text: str, options: GgufOptions, logger: Any) -> dict[str, Any]:
    """Write `folder/model-<type>.gguf`, check it in llama.cpp against PyTorch, return the facts."""
    tools = tools_or_error()
    threads = options.threads or torch.get_num_threads()
    model = bundle.model
    ctx = options.ppl_ctx
    hf_tokens = len(bundle.tokenizer(text, add_special_tokens=True)["input_ids"])
    if hf_tokens < 2 * ctx:
        raise StageError(f"export.ppl_ctx: the held-out text is {hf_tokens} tokens, llama-perplexity needs at least "
                         f"2 x ppl_ctx = {2 * ctx}; lower ppl_ctx or raise data.eval_size")
    work = folder / ".work"
    work.mkdir(parents=True, exist_ok=True)
    text_file = work / "eval.txt"
    text_file.write_text(text)
    hf_folder = work / "hf"
    source = write_float_folder(bundle, hf_folder)
    final = folder / f"model-{options.type_label}.gguf"
    write_gguf(tools, hf_folder, work, final, options, threads)

    tokens = llama_run.tokenize(tools, final, text_file)
    reader = llama_run.read_gguf(final)
    bos = bos_to_add(reader)
    # Zeros first: a cheap read of the file, before the runtime's perplexity pass.
    zeros = zeros_kept(reader, bundle.masks) if bundle.masks else {}
    ran = llama_run.perplexity(tools, final, text_file, ctx, options.ppl_chunks, threads)
    chunks = min(options.ppl_chunks, len(tokens) // ctx)
    ppl_torch = torch_perplexity(model, tokens, ctx, chunks, bos)
    diff = abs(ran["ppl"] - ppl_torch) / ppl_torch
    if not diff <= options.tolerance:
        raise StageError(f"gguf export: llama.cpp's perplexity of {final.name} is {ran['ppl']:.4f}, PyTorch's of the "
                         f"model is {ppl_torch:.4f} on the same {chunks} x {ctx} held-out tokens: {100 * diff:.2f}% "
                         f"apart (allowed {100 * options.tolerance:g}%, max_ppl_diff); the file does not compute "
                         f"the model")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    del reader

    vocab = int(getattr(model.config, "vocab_size", None) or len(bundle.tokenizer))
    rounds: dict[str, list[float]] = {}
    for _ in range(options.bench_rounds):  # interleaved, so a load change hits both runtimes alike
        for side, got in (("llama_cpp", llama_run.bench(tools, final, options.prompt_tokens, options.decode_tokens,
                                                        threads, 1)),
                          ("pytorch", torch_speed(model, vocab, options.prompt_tokens, options.decode_tokens))):
            for key, value in got.items():
                rounds.setdefault(f"{key.replace('_tokens_per_s', '')}_tokens_per_s_{side}", []).append(value)
    speed = {k: round(statistics.median(v), 2) for k, v in rounds.items()}
    hf_ids = bundle.tokenizer(text, add_special_tokens=True)["input_ids"]
    same = sum(a == b for a, b in zip(hf_ids, tokens, strict=False)) / max(len(tokens), 1)
    shutil.rmtree(work)
    facts = {
        "format": "gguf",
        "file": final.name,
        "gguf_type": options.type_label,
        "tensor_types": ", ".join(types),
        "source": source or "the PyTorch model's float weights as they are",
        "converter": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {tools.info().get('llama_cpp_python')})",
        "file_bytes": final.stat().st_size,
        "ppl_runtime": round(ran["ppl"], 4),
        "ppl_pytorch": round(ppl_torch, 4),
        "ppl_rel_diff": round(diff, 6),
        "ppl_tokens": f"{chunks} chunks x {ctx} tokens (second half of each scored)",
        "tokens_match_hf_tokenizer": round(same, 4) if len(hf_ids) == len(tokens) else
        f"{same:.4f} (HF {len(hf_ids)} tokens, llama.cpp {len(tokens)})",
        **zeros,
        **speed,
        "decode_speedup_vs_pytorch": round(speed["decode_tokens_per_s_llama_cpp"]
                                           / speed["decode_tokens_per_s_pytorch"], 3),
        "bench": f"llama-bench pp{options.prompt_tokens} / tg{options.decode_tokens}, PyTorch prefill / greedy "
                 f"KV-cache decode, {options.bench_rounds} interleaved rounds (median)",
        "threads": threads,
        "tolerances": {"max_ppl_diff": options.tolerance},
    }
    logger.info("gguf export: %s, %.1f MiB, perplexity %.4f (PyTorch %.4f, %.2f%% apart), decode %.1f vs %.1f "
                "tokens/s", final.name, facts["file_bytes"] / 2**20, ran["ppl"], ppl_torch, 100 * diff,
                speed["decode_tokens_per_s_llama_cpp"], speed["decode_tokens_per_s_pytorch"])
    return facts


HOW_TO_LOAD = """\
# llama.cpp (https://github.com/ggml-org/llama.cpp), from this folder:
#   llama-cli -m {file} -p "Once upon a time"
#   llama-perplexity -m {file} -f text.txt
# or from Python: pip install llama-cpp-python
from llama_cpp import Llama

llm = Llama(model_path="{file}")
print(llm("Once upon a time", max_tokens=32)["choices"][0]["text"])
"""
