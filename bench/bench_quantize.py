"""Quantization on two real models, through `compress.run`:

- MiniLM fine-tuned on tweets (`finetuned_minilm()`): accuracy and agreement on 1,000 held-out
  tweets, CPU latency at batch 32 (fp32 and every variant timed round-robin in one process),
  size of the quantized layers against each format's limit; plus a per-layer-type sensitivity
  study of int8-dynamic (one layer type quantized at a time) and what smoothing does to it.
- the tweets Llama (`text_lm()`, ~5M params): perplexity of every 4-bit scheme, and GPTQ against
  round-to-nearest at the same group size.

Writes reports/quantize.md and reports/quantize.json.

    python -m bench.bench_quantize               # everything (~20 min on 2 busy cores)
    python -m bench.bench_quantize sensitivity   # any of: sensitivity, minilm, lm
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (CACHE, REPORTS, finetuned_minilm, interleaved_latency, lm_data, machine_line, text_lm,
                          tweets_data)

REPEATS, WARMUP, BATCH, SEQ = 10, 2, 32, 64
CALIB = 128

# The shipped int8-dynamic setting for MiniLM (see the sensitivity table for why).
MINILM_INT8 = {"scheme": "int8-dynamic", "activation_scales": "per-tensor"}
MINILM_VARIANTS: dict[str, dict[str, Any]] = {
    "int8-dynamic, per-tensor activations": MINILM_INT8,
    "int8-dynamic, per-token activations": {"scheme": "int8-dynamic", "activation_scales": "per-token"},
    "int8-dynamic per-token + int8 embeddings": {"scheme": "int8-dynamic", "activation_scales": "per-token",
                                                 "embeddings": "int8"},
    "nf4 (bitsandbytes, double quant)": {"scheme": "nf4"},
    "int4-weight g128 + int4 embeddings": {"scheme": "int4-weight", "embeddings": "int4"},
}
LM_VARIANTS: dict[str, dict[str, Any]] = {
    "int8-dynamic, all layers": {"scheme": "int8-dynamic"},
    "int8-dynamic + smoothing 0.5": MINILM_INT8,
    "int8 (bitsandbytes)": {"scheme": "int8"},
    "nf4 (bitsandbytes, double quant)": {"scheme": "nf4"},
    "int8-weight + int8 embeddings": {"scheme": "int8-weight", "embeddings": "int8"},
    "int4-weight g128 + int4 embeddings": {"scheme": "int4-weight", "embeddings": "int4"},
}
LM_VARIANTS: dict[str, dict[str, Any]] = {
    "int8 (bitsandbytes)": {"scheme": "int8"},
    "int8-dynamic, per-tensor activations": {"scheme": "int8-dynamic", "activation_scales": "per-tensor"},
    "int8-dynamic, per-token activations (the default for LMs)": {"scheme": "int8-dynamic"},
    "nf4 (bitsandbytes, double quant)": {"scheme": "nf4"},
    "fp4 (bitsandbytes, double quant)": {"scheme": "fp4"},
    "int4-weight RTN g128": {"scheme": "int4-weight", "group_size": 128},
    "gptq g128": {"scheme": "gptq", "group_size": 128, "act_order": False, "calibration_samples": CALIB},
    "int4-weight RTN g32": {"scheme": "int4-weight", "group_size": 32},
    "gptq g32": {"scheme": "gptq", "group_size": 32, "act_order": False, "calibration_samples": CALIB},
}
SENSITIVITY_TYPES = {
    "query": ["query"], "key": ["key"], "value": ["value"], "attention.output.dense": [r"attention\.output\.dense"],
    "intermediate.dense (FFN in)": [r"intermediate\.dense"], "output.dense (FFN out)": [r"\d+\.output\.dense"],
    "pooler.dense": [r"pooler\.dense"],
}


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors") if f.name != "masks.safetensors")


def run_variants(kind: str, model: Path, task: str, data: dict[str, Any], variants: dict[str, dict[str, Any]],
                 speed: bool = False) -> list[dict[str, Any]]:
    """One compress.run per variant; the first run also evaluates the fp32 baseline."""
    from compress import run

    rows: list[dict[str, Any]] = []
    for i, (label, stage) in enumerate(variants.items()):
        out = CACHE / f"bench-quantize-{kind}-{i:02d}"
        started = time.perf_counter()
        report = run({"name": f"bench-quantize-{kind}-{i}", "model": {"path": str(model), "task": task},
                      "data": data,
                      "eval": {"baseline": i == 0, "speed": speed and i == 0, "batch_size": BATCH, "seq_len": SEQ,
                               "warmup": WARMUP, "repeats": REPEATS, "eval_batch_size": 64},
                      "output_dir": str(out), "stages": [{"type": "quantize", **stage}]},
                     overwrite=True, show_progress=False)
        if i == 0:
            rows.append(_row("fp32", {}, report.baseline, model, None))
        point = report.final
        rows.append(_row(label, stage, point, out / point.name, round(time.perf_counter() - started, 1)))
        print(f"{kind} {label}: {rows[-1]['perplexity'] or rows[-1]['accuracy']}", flush=True)
    return rows


def _row(label: str, stage: dict[str, Any], point: Any, folder: Path, wall: float | None) -> dict[str, Any]:
    info = point.stage_info
    return {"variant": label, "stage": stage, "folder": str(folder), "weight_bytes": weight_bytes(folder),
            "accuracy": point.accuracy.accuracy, "perplexity": point.accuracy.perplexity,
            "agreement": point.accuracy.agreement, "eval_examples": point.accuracy.examples,
            "runner_latency_b32_ms": point.speed.latency_bn_ms if point.speed else None,
            "stage_seconds": point.stage_seconds, "wall_seconds": wall,
            "quantized_layers": info.get("quantized_layers"), "quantized_share": info.get("quantized_share"),
            "bits_per_weight": info.get("quantized_bits_per_weight"),
            "compression": info.get("quantized_compression"), "limit_bits": info.get("limit_bits_per_weight"),
            "limit_compression": info.get("limit_compression"), "layers": info.get("layers", [])}


def time_side_by_side(rows: list[dict[str, Any]]) -> None:
    """Load every variant, then time them round-robin so machine load hits all of them alike."""
    import torch

    from compress.bundle import ModelBundle

    models = [ModelBundle.load(r["folder"]).model.eval() for r in rows]
    times = interleaved_latency(models, BATCH, SEQ, WARMUP, REPEATS, low=1000)
    for row, t in zip(rows, times, strict=True):
        row["latency_b32_ms"] = round(1000 * statistics.median(t), 2)


def sensitivity(model_dir: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """int8-dynamic on one layer type at a time (and variants), against fp32 on the same batches."""
    import torch

    from compress import ModelBundle, load_recipe
    from compress.context import RunContext
    from compress.data import load_data, pad_collate
    from compress.stages.quantize import Quantize, run_quantize

    recipe = load_recipe({"name": "s", "model": {"path": str(model_dir), "task": "sequence-classification"},
                          "data": data})
    loaded = load_data(recipe.data, "sequence-classification", 0)
    tokenizer = ModelBundle.load(model_dir).tokenizer
    ev = loaded.tokenized("eval", tokenizer)
    collate = pad_collate(tokenizer)
    batches = [collate([ev[i] for i in range(s, min(s + 64, len(ev)))]) for s in range(0, len(ev), 64)]
    labels = torch.cat([b.pop("labels") for b in batches])

    def logits(model: Any) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(**b).logits for b in batches])

    ref = logits(ModelBundle.load(model_dir).model.eval())
    ctx = RunContext(output_dir=CACHE / "bench-quantize-sens", seed=0, device="cpu", data=loaded,
                     show_progress=False)
    variants: list[tuple[str, dict[str, Any]]] = [("fp32", {})]
    variants += [(f"only {name} (per-tensor)", {"include": pats, "activation_scales": "per-tensor"})
                 for name, pats in SENSITIVITY_TYPES.items()]
    variants += [("all, per-tensor activations (as torch quantize_dynamic)", {"activation_scales": "per-tensor"}),
                 ("all, per-tensor + classifier head", {"activation_scales": "per-tensor", "quantize_head": True}),
                 ("all, per-tensor, smoothing 0.5", {"activation_scales": "per-tensor", "smooth_alpha": 0.5,
                                                     "calibration_samples": CALIB}),
                 ("all, per-token activations", {"activation_scales": "per-token"}),
                 ("all, per-token + classifier head", {"activation_scales": "per-token", "quantize_head": True})]
    rows = []
    for label, settings in variants:
        model = ModelBundle.load(model_dir).model.eval()
        if label != "fp32":
            bundle = ModelBundle(model=model, tokenizer=tokenizer, task="sequence-classification")
            model = run_quantize(bundle, Quantize(scheme="int8-dynamic", **settings), ctx).bundle.model
        out = logits(model)
        rows.append({"variant": label, "settings": settings,
                     "accuracy": round(float((out.argmax(-1) == labels).float().mean()), 4),
                     "agreement": round(float((out.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                     "logit_cosine": round(float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()), 4),
                     "max_abs_logit_error": round(float((out - ref).abs().max()), 4)})
        print("sensitivity", rows[-1], flush=True)
    return rows


def main(kinds: list[str]) -> None:
    import torch

    result: dict[str, Any] = {}
    previous = REPORTS / "quantize.json"
    if previous.exists():
        result = json.loads(previous.read_text())
    result.update({"machine": machine_line(), "threads": torch.get_num_threads(),
                   "latency": {"batch": BATCH, "seq_len": SEQ, "warmup": WARMUP, "repeats": REPEATS,
                               "method": "median, all variants timed round-robin in one process"}})
    data = tweets_data(train=2000, eval_size=2000, max_eval_samples=1000)
    if "sensitivity" in kinds:
        result["minilm_sensitivity"] = sensitivity(finetuned_minilm(), data)
    if "minilm" in kinds:
        rows = run_variants("minilm", finetuned_minilm(), "sequence-classification", data, MINILM_VARIANTS,
                            speed=True)
        time_side_by_side(rows)
        result["minilm"] = rows
    if "lm" in kinds:
        rows = run_variants("lm", text_lm(), "causal-lm", lm_data(train=3000, eval_size=2000), LM_VARIANTS)
        result["lm"] = rows
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "quantize.json").write_text(json.dumps(result, indent=1))
    (REPORTS / "quantize.md").write_text(render(result))
    print((REPORTS / "quantize.md").read_text())


def _size_cells(r: dict[str, Any], base: dict[str, Any]) -> list[str]:
    if not r["bits_per_weight"]:
        return [f"{r['weight_bytes'] / 2**20:.2f} MiB", "–", "–", "–"]
    return [f"{r['weight_bytes'] / 2**20:.2f} MiB ({base['weight_bytes'] / r['weight_bytes']:.2f}×)",
            f"{100 * r['quantized_share']:.0f}%", f"{r['bits_per_weight']:.3f} ({r['compression']:.2f}×)",
            f"{r['limit_bits']:.3f} ({r['limit_compression']:.2f}×)"]


def render(result: dict[str, Any]) -> str:
    lat = result["latency"]
    out = ["# Quantization", "",
           f"Machine: {result['machine']}. Threads: {result['threads']}. Generated by "
           "`python -m bench.bench_quantize`. Weights on disk = the model's safetensors files. "
           "\"Quantized layers\" = bits per weight of the quantized layers, counting every stored scale, zero "
           "point, absmax and code book (bias excluded), next to the format's limit on an infinitely large "
           "layer; compression is against fp32.", ""]
    if "minilm_sensitivity" in result:
        rows = result["minilm_sensitivity"]
        out += ["## MiniLM int8-dynamic: which layers hurt", "",
                f"Fine-tuned MiniLM-L6 (3-class tweets), {len(rows) and 1000} held-out tweets, one layer type "
                "quantized at a time (fbgemm dynamic int8: per-channel int8 weights, one activation scale per "
                "tensor). Agreement = same predicted class as fp32; cosine = mean cosine of logits to fp32.", "",
                "| variant | accuracy | agreement | logit cosine | max logit error |", "|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['variant']} | {100 * r['accuracy']:.2f}% | {100 * r['agreement']:.2f}% | "
                       f"{r['logit_cosine']:.4f} | {r['max_abs_logit_error']:.3f} |")
        out.append("")
    if "minilm" in result:
        rows = result["minilm"]
        base = rows[0]
        out += ["## MiniLM fine-tuned on tweets: every scheme", "",
                f"Accuracy on {base['eval_examples']} held-out tweets. Latency: batch {lat['batch']}, sequence "
                f"{lat['seq_len']}, {lat['method']}, {lat['warmup']} warm-up + {lat['repeats']} repeats.", "",
                "| variant | accuracy | agreement | latency b32 ms | weights on disk | share quantized | "
                "quantized layers bits/w | format limit |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            agree = f"{100 * r['agreement']:.2f}%" if r["agreement"] is not None else "–"
            out.append("| " + " | ".join([
                r["variant"], f"{100 * r['accuracy']:.2f}% ({100 * (r['accuracy'] - base['accuracy']):+.2f} pt)",
                agree, f"{r['latency_b32_ms']:.1f} ({base['latency_b32_ms'] / r['latency_b32_ms']:.2f}× faster)",
                *_size_cells(r, base)]) + " |")
        if base.get("runner_latency_b32_ms") is not None:
            out += ["", f"The runner's own fp32 baseline latency in the first run (same settings, timed alone): "
                    f"{base['runner_latency_b32_ms']:.1f} ms."]
        out.append("")
    if "lm" in result:
        rows = result["lm"]
        base = rows[0]
        by = {r["variant"]: r for r in rows}
        out += ["## Causal LM: tweets Llama (4 layers, hidden 256, ~5M params)", "",
                f"Perplexity on {base['eval_examples']} held-out 64-token blocks of tweet text; lm_head and "
                f"embeddings stay fp32. GPTQ calibrates on {CALIB} training blocks (seed = stage seed).", "",
                "| variant | perplexity | ratio to fp32 | weights on disk | quantized layers bits/w | format limit |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            out.append("| " + " | ".join([r["variant"], f"{r['perplexity']:.3f}",
                                          f"{r['perplexity'] / base['perplexity']:.4f}",
                                          *[c for i, c in enumerate(_size_cells(r, base)) if i != 1]]) + " |")
        out.append("")
        for g in ("128", "32"):
            rtn, gptq = by.get(f"int4-weight RTN g{g}"), by.get(f"gptq g{g}")
            if rtn and gptq:
                gap = rtn["perplexity"] - base["perplexity"]
                closed = (rtn["perplexity"] - gptq["perplexity"]) / gap if gap > 0 else float("nan")
                out.append(f"- group {g}: GPTQ perplexity {gptq['perplexity']:.3f} vs round-to-nearest "
                           f"{rtn['perplexity']:.3f}: closes {100 * closed:.0f}% of RTN's gap to fp32.")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:] or ["sensitivity", "minilm", "lm"])
