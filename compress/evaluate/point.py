"""One eval point: size, speed and accuracy of a bundle, as the recipe's `eval` section asks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.bundle import ModelBundle
from compress.evaluate.accuracy import evaluate_accuracy
from compress.evaluate.size import measure_size
from compress.evaluate.speed import measure_speed
from compress.placement import has_offloaded_weights
from compress.report.schema import EvalPoint
from compress.specs import EvalSpec


def evaluate_bundle(
    bundle: ModelBundle,
    name: str,
    spec: EvalSpec,
    *,
    data: Any = None,
    device: str = "cpu",
    seed: int = 0,
    saved_dir: Path | None = None,
    reference: torch.Tensor | None = None,
) -> tuple[EvalPoint, torch.Tensor | None]:
    """Measure `bundle`; returns the eval point and its predictions (for later agreement checks)."""
    # An offloaded model (model.device_map) saves shard by shard, each read back from the offload store:
    # small shards keep that within memory.
    shard = {"max_shard_size": "500MB"} if has_offloaded_weights(bundle.model) else {}
    save_fn = None if saved_dir else (lambda tmp: bundle.model.save_pretrained(tmp, **shard))
    point = EvalPoint(name=name, size=measure_size(bundle.model, saved_dir=saved_dir, save_fn=save_fn))
    preds = None
    if spec.accuracy and data is not None:
        point.accuracy, preds = evaluate_accuracy(
            bundle.model, data.tokenized("eval", bundle.tokenizer), bundle.tokenizer, bundle.task,
            batch_size=spec.eval_batch_size, device=device, num_labels=data.num_labels, reference=reference,
        )
    if spec.lm_eval is not None and bundle.task == "causal-lm":
        from compress.evaluate.accuracy import AccuracyMetrics
        from compress.evaluate.harness import run_lm_eval

        point.accuracy = point.accuracy or AccuracyMetrics(examples=0)
        point.accuracy.lm_eval = run_lm_eval(bundle.model, bundle.tokenizer, spec.lm_eval, device)
    if spec.speed:
        point.speed = measure_speed(
            bundle.model, bundle.tokenizer, batch_size=spec.batch_size, seq_len=spec.seq_len,
            warmup=spec.warmup, repeats=spec.repeats, threads=spec.threads, device=device, seed=seed,
        )
    if point.size.sparsity > 0.01:
        point.notes.append(
            "Unstructured zeros are stored and multiplied like any weight by dense kernels: "
            "they shrink nothing and speed nothing up unless a sparse format or kernel is used."
        )
    return point, preds
