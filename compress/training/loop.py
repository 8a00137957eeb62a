"""The training loop, on accelerate: written once, used by fine-tuning and distillation.

Distillation plugs in through `loss_fn(model, batch) -> (loss, logs)`; fine-tuning uses the model's
own loss. Pruning masks are re-applied after every optimizer step so pruned weights stay zero.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from compress.errors import StageError

LossFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]


class TrainingFields(BaseModel):
    """Training settings shared by every stage that trains (mixed into their configs)."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Examples per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with linear LR warm-up.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="LR schedule after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate on held-out data every N steps.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without improvement (needs eval_every)."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 on a GPU that supports it, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    max_train_samples: int | None = Field(None, gt=0, description="Use at most this many training examples.")


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    stopped_early: bool = False
    peak_memory_bytes: int | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "train_seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples / self.seconds, 3) if self.seconds else None,
            "tokens_per_second": round(self.tokens / self.seconds, 3) if self.seconds else None,
            "final_loss": self.loss_curve[-1][1] if self.loss_curve else None,
            "loss_curve": self.loss_curve,
            "eval_curve": self.eval_curve,
            "stopped_early": self.stopped_early,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def _mixed_precision(setting: str, device: str) -> str:
    if device != "cuda":
        return "no"
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting


def apply_masks(model: Any, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight (mask False). Names are the base model's parameter names."""
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = params.get(name)
            if param is not None:
                param.mul_(mask.to(param.device, param.dtype))


def train(
    model: Any,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    settings: TrainingFields,
    *,
    device: str,
    seed: int,
    loss_fn: LossFn | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_metric: str = "loss",
    masks: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
    label: str = "train",
) -> TrainResult:
    """Train `model` in place on `dataset`. Returns the curves and throughput figures."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    torch.manual_seed(seed)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(settings.mixed_precision, device),
        gradient_accumulation_steps=settings.grad_accum,
        cpu=device == "cpu",
    )
    if settings.max_train_samples:
        dataset = dataset.select(range(min(settings.max_train_samples, len(dataset))))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, collate_fn=collate,
                        generator=generator)
    steps_per_epoch = max(1, math.ceil(len(loader) / settings.grad_accum))
    total_steps = settings.max_steps or max(1, math.ceil(steps_per_epoch * settings.epochs))

    if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise StageError(f"{label}: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(settings.scheduler, optimizer,
                              num_warmup_steps=int(settings.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    result = TrainResult()
    best, since_best = None, 0
    progress = _progress(total_steps, label, show_progress)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.train()
    running = 0.0
    micro = 0
    while result.steps < total_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                if not torch.isfinite(loss):
                    progress.close()
                    raise StageError(
                        f"{label}: the loss became {loss.item()} at step {result.steps}; training stopped. "
                        f"Try a lower lr, fp32 (mixed_precision: no) or bf16 instead of fp16"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += loss.item()
            micro += 1
            result.samples += batch["input_ids"].shape[0]
            result.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch[
                "input_ids"].numel()
            if not accelerator.sync_gradients:
                continue
            if masks:
                apply_masks(accelerator.unwrap_model(model), masks)
            result.steps += 1
            avg = running / micro
            running, micro = 0.0, 0
            result.loss_curve.append((result.steps, round(avg, 5)))
            progress.update(1)
            progress.set_postfix(loss=f"{avg:.4f}")
            if evaluate and settings.eval_every and result.steps % settings.eval_every == 0:
                model.eval()
                metrics = evaluate(accelerator.unwrap_model(model))
                model.train()
                result.eval_curve.append((result.steps, metrics))
                score = metrics.get(eval_metric)
                if score is not None and settings.early_stopping_patience:
                    better = best is None or (score < best if eval_metric == "loss" else score > best)
                    best, since_best = (score, 0) if better else (best, since_best + 1)
                    if since_best >= settings.early_stopping_patience:
                        result.stopped_early = True
                        break
            if result.steps >= total_steps:
                break
        if result.stopped_early:
            break
    progress.close()
    result.seconds = time.perf_counter() - start
    if device == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated()
    model = accelerator.unwrap_model(model)
    model.eval()
    if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    accelerator.free_memory()
    return result


def _progress(total: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    # Quiet in CI logs and pipes: a progress bar only on a terminal.
    return tqdm(total=total, desc=label, disable=not (enabled and sys.stderr.isatty()), leave=False)
