"""The one training entry stages use: the shared loop, wired from the run context.

`train()` in loop.py is the loop itself and takes every setting explicitly, so it can be driven and
tested on its own. Stages (fine-tuning, distillation, task adapters) call `train_in_stage` instead:
device, seed, progress, the mid-stage checkpoint folder, resume and the stop flag all come from the
context, so a new training stage cannot forget one of them (distillation once ignored Ctrl-C because
its call lacked the stop flag).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from compress.training.loop import LossFn, TrainingFields, TrainResult, train

if TYPE_CHECKING:
    from compress.context import RunContext
    from compress.registry import StageConfig

CHECKPOINT_DIR = "checkpoint"


def eval_metric_for(task: str) -> str:
    """The held-out metric early stopping and best-checkpoint selection watch for a task."""
    return "accuracy" if task == "sequence-classification" else "eval_loss"


def held_out_evaluator(eval_set: Any, tokenizer: Any, task: str, *, device: str, num_labels: int | None,
                       pick: Callable[[Any], Any] = lambda model: model) -> Callable[[Any], dict[str, float]]:
    """An `evaluate(model)` for the loop: the held-out metrics of `pick(model)` (e.g. a distillation
    wrapper's student), as floats."""
    from compress.evaluate.accuracy import evaluate_accuracy

    def evaluate(model: Any) -> dict[str, float]:
        metrics, _ = evaluate_accuracy(pick(model), eval_set, tokenizer, task, device=device, num_labels=num_labels)
        return {k: v for k, v in metrics.model_dump().items() if isinstance(v, float)}

    return evaluate


def train_in_stage(model: Any, dataset: Any, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
                   config: TrainingFields | StageConfig, ctx: RunContext, *, task: str,
                   evaluate: Callable[[Any], dict[str, float]] | None = None, loss_fn: LossFn | None = None,
                   masks: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train `model` in place with the stage's training fields, under the run context: the context's
    device and seed, its progress setting, a checkpoint in the stage's work folder (resumed when the run
    resumes) and its stop flag (Ctrl-C checkpoints and stops at the next step)."""
    assert ctx.work_dir is not None  # RunContext always sets one
    return train(model, dataset, collate, config,  # type: ignore[arg-type]
                 device=ctx.device, seed=ctx.seed, loss_fn=loss_fn, evaluate=evaluate,
                 eval_metric=eval_metric_for(task), masks=masks, show_progress=ctx.show_progress,
                 label=config.label(),  # type: ignore[union-attr]
                 checkpoint_dir=ctx.work_dir / CHECKPOINT_DIR, resume=ctx.resume, stop=ctx.stop)
