"""ONNX export of a causal LM for ONNX Runtime: the fp32 graph, or int4 weight-only `MatMulNBits`.

Path: `torch.onnx.export(dynamo=True)` of a float copy of the model with its KV cache as inputs and
outputs (onnx_kv.py; input_ids, attention_mask, past -> logits, present) -> optionally ONNX Runtime's own `MatMulNBitsQuantizer` (4-bit weights in
blocks along the input dimension, one scale (and zero point) per block; activations stay float).
The result is checked in ONNX Runtime: the fp32 graph must give PyTorch's logits, and the written
model's perplexity on the held-out tokens must be within a tolerance of PyTorch's on the same
tokens, else `StageError` with both numbers.

Token-by-token decoding through the cache must give the graph's own whole-sequence logits (else
`StageError`); decode tokens/s are measured beside PyTorch's. An architecture whose cache the exporter
cannot trace gets a prefill-only graph, with the reason in `decode_note`. A model whose quantized layers are all compress's
int4 weight-only layers with a MatMulNBits-sized group is written from its own codes (onnx_nbits.py:
nothing is rounded again, so the graph must give compress's logits); any other quantized model is
exported as its dequantized weights and rounded by ORT's quantizer (`source` in the facts says why).
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import StageError
from compress.export import onnx as onnx_export
from compress.export import onnx_kv
from compress.export.measure import parity, side_by_side
from compress.export.onnx_nbits import int4_layers, write_nbits

# Relative perplexity difference allowed between the ONNX model in ORT and the PyTorch model on the
# same tokens. fp32: the same math on other kernels (tiny Llama measured ~1e-7). int4 changes the model
# itself: on SmolLM2-135M (block 32) ORT's HQQ measured +0.09% and its round-to-nearest +25% (so HQQ
# is the default; reports/deploy.md). compress's own int4 codes written as they are compute the same
# model, so they are held to the float tolerance.
FLOAT_PPL_TOLERANCE = 1e-3
INT4_PPL_TOLERANCE = 0.10
DECODE_NOTE = ("prefill only: the graph takes input_ids and attention_mask and returns every position's "
               "logits; it has no past key/value inputs or outputs, so generation re-runs the whole sequence "
               "per new token.")
# Tokens fed one at a time through the graph's cache must give the logits the graph gives for the
# whole sequence at once; only the summation order differs (tiny Llama measured ~1e-7 of the largest
# logit; MatMulNBits has separate one-row kernels, hence the margin).
KV_TOLERANCE = 1e-3
DECODE_TOKENS = 32


@dataclass
class OnnxLmOptions:
    """What to write and how strictly to check it (defaults: the constants above)."""

    quantize: str = "int4"  # "int4" (MatMulNBits weight-only) or "none" (the fp32 graph)
    block_size: int = 32
    symmetric: bool = False
    int4_algorithm: str = "hqq"  # ORT's quantizer: "hqq" (fits scales and zero points) or "rtn"
    max_rel_logit_diff: float = onnx_export.FLOAT_TOLERANCE
    max_ppl_diff: float | None = None
    ppl_ctx: int = 128
    ppl_chunks: int = 16
    seq_len: int = 64
    repeats: int = 10

    def tolerance(self, rounds_again: bool) -> float:
        """The perplexity tolerance: the field, else by whether ORT rounded the weights (again)."""
        if self.max_ppl_diff is not None:
            return self.max_ppl_diff
        return INT4_PPL_TOLERANCE if rounds_again else FLOAT_PPL_TOLERANCE


INT4_ALGORITHMS = {"hqq": "half-quadratic (HQQ)", "rtn": "round-to-nearest"}


def quantize_int4(src: Path, dst: Path, block_size: int, symmetric: bool, algorithm: str = "hqq") -> int:
    """ONNX Runtime's MatMulNBits quantizer (4-bit weights, float activations) on every MatMul with a
    constant weight; returns how many MatMulNBits nodes the graph holds. `hqq` fits each block's scale
    and zero point to the weights (data-free, Badri & Shaji 2023); `rtn` rounds to the nearest level."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # The quantizer logs two INFO lines per node; the stage's own log says what happened.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = (HQQWeightOnlyQuantConfig(block_size=block_size) if algorithm == "hqq" else
              DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), False)
    return sum(node.op_type == "MatMulNBits" for node in onnx.load(str(dst)).graph.node)


def token_chunks(tokenizer: Any, text: str, ctx: int, limit: int) -> torch.Tensor:
    """The held-out text tokenised once and cut into at most `limit` rows of `ctx` tokens."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    n = min(limit, len(ids) // ctx)
    if n == 0:
        raise StageError(f"export.ppl_ctx: the held-out text is {len(ids)} tokens, shorter than one chunk of "
                         f"ppl_ctx = {ctx}; lower ppl_ctx or raise data.eval_size")
    return torch.tensor(ids[:n * ctx]).view(n, ctx)


def perplexity(logits_of: Any, rows: torch.Tensor, per_batch: int = 4) -> float:
    """exp(mean negative log-likelihood) of tokens 1..ctx-1 of each row given the ones before."""
    nll, count = 0.0, 0
    for start in range(0, len(rows), per_batch):
        batch = rows[start:start + per_batch]
        logits = logits_of(batch)[:, :-1].double()
        target = batch[:, 1:]
        nll -= float(torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).sum())
        count += target.numel()
    return math.exp(nll / count)


def _feed(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _check_decode(sess: Any, model: nn.Module, rows: torch.Tensor, vocab: int) -> dict[str, Any]:
    """The cache check (else StageError) and greedy decode tokens/s, ORT vs PyTorch (interleaved, median)."""
    from compress.export.gguf import torch_speed

    ids = rows[:1, :min(rows.shape[1], 24)].numpy()
    drift = onnx_kv.decode_parity(sess, model.config, ids, prompt=ids.shape[1] // 2)
    if not drift <= KV_TOLERANCE:
        raise StageError(f"onnx export: the graph's logits for tokens fed one at a time through its KV cache differ "
                         f"from its logits for the whole sequence by {drift:.3g} of the largest logit (allowed "
                         f"{KV_TOLERANCE:g}): the cache inputs/outputs do not carry the model's state")
    rounds: dict[str, list[float]] = {"onnxruntime": [], "pytorch": []}
    for _ in range(3):  # interleaved, so a load change hits both runtimes alike
        rounds["onnxruntime"].append(onnx_kv.ort_decode_speed(sess, model.config, vocab, DECODE_TOKENS))
        rounds["pytorch"].append(torch_speed(model, vocab, 8, DECODE_TOKENS)["decode_tokens_per_s"])
    return {"kv_cache": True, "kv_decode_max_rel_logit_diff": drift,
            **{f"decode_tokens_per_s_{side}": round(statistics.median(v), 2) for side, v in rounds.items()},
            "decode_bench": f"greedy, {DECODE_TOKENS} tokens after a 1-token context, KV cache on both sides, "
                            f"3 interleaved rounds (median)"}


def export_onnx_lm(model: nn.Module, tokenizer: Any, folder: Path, text: str, options: OnnxLmOptions,
                   logger: Any) -> dict[str, Any]:
    """Write `folder/model.onnx` (+ tokenizer), check it in ONNX Runtime, return the facts."""
    rows = token_chunks(tokenizer, text, options.ppl_ctx, options.ppl_chunks)
    exportable, reason = onnx_export.float_copy(model)
    work = folder / ".graphs"
    work.mkdir(parents=True, exist_ok=True)
    float_path, final = work / "float.onnx", folder / onnx_export.GRAPH
    kv_problem = None
    try:
        onnx_kv.export_kv_graph(exportable, float_path)
    except Exception as exc:  # noqa: BLE001  (any tracing failure: fall back to a graph without the cache)
        kv_problem = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        logger.warning("onnx export: the KV-cache graph did not export (%s); writing a prefill-only graph",
                       kv_problem)
        onnx_export.export_graph(exportable, _feed(rows[:1]), float_path, use_cache=False)

    def torch_logits(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return m(**_feed(ids), use_cache=False).logits.float()

    def ort_logits(sess: Any, ids: torch.Tensor) -> torch.Tensor:
        if kv_problem is None:  # a prompt: run with an empty cache
            return torch.from_numpy(onnx_kv.run_cached(sess, model.config, ids.numpy())[0]).float()
        return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in _feed(ids).items()})[0]).float()

    # The fp32 graph must compute its float source before anything is rounded.
    probe = rows[:2]
    graph_parity = parity(torch_logits(exportable, probe), ort_logits(onnx_export.session(float_path), probe))
    if not graph_parity["max_rel_logit_diff"] <= options.max_rel_logit_diff:
        raise StageError(f"onnx export: the fp32 graph's logits differ from PyTorch's by "
                         f"{graph_parity['max_abs_logit_diff']:.4g} ({graph_parity['max_rel_logit_diff']:.3g} of the "
                         f"largest logit; allowed {options.max_rel_logit_diff:g}, max_rel_logit_diff) on "
                         f"{len(probe)} x {options.ppl_ctx} held-out tokens: the exported graph does not compute "
                         f"the model")
    nbits, source, rounds_again = 0, None, False
    own, others = int4_layers(model) if options.quantize == "int4" else ({}, [])
    if own and not others:
        missing = write_nbits(float_path, final, own)
        if missing:
            raise StageError(f"onnx export: compress's int4 layer(s) {', '.join(missing[:3])} are not a MatMul with a "
                             f"constant weight in the exported graph, so their codes cannot be written into "
                             f"MatMulNBits; export the float model (before the quantize stage)")
        nbits = len(own)
        source = (f"compress's own int4 codes, scales and zero points of {nbits} layers written into MatMulNBits "
                  f"as they are (nothing rounded again); the model's float layers stay float")
        final_parity = parity(torch_logits(model, probe), ort_logits(onnx_export.session(final), probe))
        if not final_parity["max_rel_logit_diff"] <= options.max_rel_logit_diff:
            raise StageError(f"onnx export: the MatMulNBits graph's logits differ from compress's int4 model's by "
                             f"{final_parity['max_rel_logit_diff']:.3g} of the largest logit (allowed "
                             f"{options.max_rel_logit_diff:g}, max_rel_logit_diff): the written codes, scales or "
                             f"zero points are not compress's")
    elif options.quantize == "int4":
        rounds_again = True
        nbits = quantize_int4(float_path, final, options.block_size, options.symmetric, options.int4_algorithm)
        if nbits == 0:
            raise StageError("onnx export: ONNX Runtime's MatMulNBits quantizer found no MatMul with a constant "
                             "weight in the graph; nothing was quantized (use quantize: none)")
        if reason:
            source = (f"{reason}; ONNX Runtime's MatMulNBits quantizer rounds them again (block {options.block_size}"
                      f"), as compress's codes do not map onto MatMulNBits here: {'; '.join(others[:3])}"
                      f"{'; ...' if len(others) > 3 else ''}")
    else:
        os.replace(float_path, final)
    tolerance = options.tolerance(rounds_again)
    sess = onnx_export.session(final)
    ppl_torch = perplexity(lambda ids: torch_logits(model, ids), rows)
    ppl_ort = perplexity(lambda ids: ort_logits(sess, ids), rows)
    diff = abs(ppl_ort - ppl_torch) / ppl_torch
    if not diff <= tolerance:
        raise StageError(f"onnx export: ONNX Runtime's perplexity of the {options.quantize} graph is {ppl_ort:.4f}, "
                         f"PyTorch's of the model is {ppl_torch:.4f} on the same {len(rows)} x {options.ppl_ctx} "
                         f"held-out tokens: {100 * diff:.3f}% apart (allowed {100 * tolerance:g}%, "
                         f"max_ppl_diff); use quantize: none, a smaller block_size, or loosen max_ppl_diff")

    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    decode = _check_decode(sess, model, rows, vocab) if kv_problem is None else {
        "decode_note": f"{DECODE_NOTE} The KV-cache graph did not export: {kv_problem}"}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, options.seq_len), generator=gen)
    arrays = {k: v.numpy() for k, v in _feed(ids).items()}
    if kv_problem is None:
        arrays.update(onnx_kv.empty_cache(model.config, 1))
    latency = side_by_side({"pytorch": lambda: model(**_feed(ids), use_cache=False),
                            "onnxruntime": lambda: sess.run(None, arrays)}, repeats=options.repeats)
    onnx_export.finish_folder(folder, work, tokenizer)
    facts = {
        "format": "onnx",
        "file": onnx_export.GRAPH,
        "task": "causal-lm",
        "quantize": options.quantize,
        "matmul_nbits_nodes": nbits,
        "block_size": (options.block_size if rounds_again else sorted({m.group for m in own.values()}) or None)
        if options.quantize == "int4" else None,
        "symmetric": (options.symmetric if rounds_again else False) if options.quantize == "int4" else None,
        "int4_codes": (f"onnxruntime ({INT4_ALGORITHMS[options.int4_algorithm]})" if rounds_again
                       else "compress's own")
        if options.quantize == "int4" else None,
        "source": source or reason or "the PyTorch model as it is (float)",
        "file_bytes": final.stat().st_size,
        "ppl_runtime": round(ppl_ort, 4),
        "ppl_pytorch": round(ppl_torch, 4),
        "ppl_rel_diff": round(diff, 6),
        "ppl_tokens": f"{len(rows)} chunks x {options.ppl_ctx} tokens (all but the first of each scored)",
        "fp32_graph_max_rel_logit_diff": graph_parity["max_rel_logit_diff"],
        f"latency_prefill{options.seq_len}_ms_pytorch": latency["pytorch"],
        f"latency_prefill{options.seq_len}_ms_onnxruntime": latency["onnxruntime"],
        **decode,
        "threads": torch.get_num_threads(),
        "tolerances": {"max_rel_logit_diff": options.max_rel_logit_diff, "max_ppl_diff": tolerance},
    }
    logger.info("onnx export (causal LM, %s): %.1f MiB, perplexity %.4f (PyTorch %.4f, %.3f%% apart)",
                options.quantize, final.stat().st_size / 2**20, ppl_ort, ppl_torch, 100 * diff)
    return facts


HOW_TO_LOAD_KV = """\
import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}")
session = ort.InferenceSession("{folder}/model.onnx", providers=["CPUExecutionProvider"])
# The KV cache: one empty (batch 1, past length 0) tensor per past.* input; each call returns the next.
cache = {{i.name: np.zeros([1 if d == "batch" else 0 if d == "past" else d for d in i.shape], np.float32)
         for i in session.get_inputs() if i.name.startswith("past.")}}
ids = tokenizer("Once upon a time", return_tensors="np")["input_ids"]
step = ids
for _ in range(16):  # greedy decoding through the cache
    seen = next(iter(cache.values())).shape[2] + step.shape[1]
    logits, *present = session.run(None, {{"input_ids": step, "attention_mask": np.ones((1, seen), np.int64),
                                          **cache}})
    cache = dict(zip(cache, present))
    step = logits[:, -1:].argmax(-1)
    ids = np.concatenate([ids, step], axis=1)
print(tokenizer.decode(ids[0]))
"""

HOW_TO_LOAD = """\
import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}")
session = ort.InferenceSession("{folder}/model.onnx", providers=["CPUExecutionProvider"])
ids = tokenizer("Once upon a time", return_tensors="np")["input_ids"]
for _ in range(16):  # greedy; no KV cache in this graph, so each step re-runs the sequence
    logits = session.run(None, {{"input_ids": ids, "attention_mask": np.ones_like(ids)}})[0]
    ids = np.concatenate([ids, logits[:, -1:].argmax(-1)], axis=1)
print(tokenizer.decode(ids[0]))
"""
