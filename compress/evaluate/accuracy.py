"""Accuracy: classification accuracy / macro-F1, causal-LM perplexity, agreement with a reference.

Macro-F1 is a few lines of tensor arithmetic; pulling in scikit-learn for it is not worth the weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader

from compress.data import pad_collate
from compress.report.schema import AccuracyMetrics


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent from both: it does not count toward the average
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@torch.inference_mode()
def predict(model: Any, dataset: Any, tokenizer: Any, task: str, batch_size: int = 64,
            device: str = "cpu") -> dict[str, Any]:
    """Run the model over a tokenised dataset; returns predictions, labels and summed loss."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=pad_collate(tokenizer))
    preds, labels, loss_sum, count = [], [], 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        logits = out.logits.float()
        if task == "sequence-classification":
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
            loss_sum += float(out.loss) * len(batch["labels"])
            count += len(batch["labels"])
        else:
            # Prompt/P-tuning prepend virtual tokens and return their logits too: score the real ones.
            logits = logits[:, logits.shape[1] - batch["labels"].shape[1]:]
            # Token-level loss over positions with a real next-token label.
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            mask = shift_labels != -100
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            loss_sum += float(loss)
            count += int(mask.sum())
            preds.append(shift_logits.argmax(-1)[mask].cpu())
            labels.append(shift_labels[mask].cpu())
    return {"preds": torch.cat(preds), "labels": torch.cat(labels), "loss_sum": loss_sum, "count": count}


def evaluate_accuracy(model: Any, dataset: Any, tokenizer: Any, task: str, *, batch_size: int = 64,
                      device: str = "cpu", num_labels: int | None = None,
                      reference: torch.Tensor | None = None) -> tuple[AccuracyMetrics, torch.Tensor]:
    """Metrics for the task, and the predictions (kept to measure later models' agreement)."""
    out = predict(model, dataset, tokenizer, task, batch_size, device)
    preds, labels = out["preds"], out["labels"]
    mean_loss = out["loss_sum"] / max(out["count"], 1)
    agreement = None
    if reference is not None and reference.shape == preds.shape:
        agreement = round(float((reference == preds).float().mean()), 6)
    if task == "sequence-classification":
        metrics = AccuracyMetrics(
            examples=len(labels),
            accuracy=round(float((preds == labels).float().mean()), 6),
            macro_f1=round(macro_f1(preds, labels, num_labels or int(labels.max()) + 1), 6),
            eval_loss=round(mean_loss, 6),
            agreement=agreement,
        )
    else:
        metrics = AccuracyMetrics(
            examples=len(dataset),
            perplexity=round(math.exp(min(mean_loss, 50.0)), 4),
            eval_loss=round(mean_loss, 6),
            accuracy=round(float((preds == labels).float().mean()), 6),
            agreement=agreement,
        )
    return metrics, preds
