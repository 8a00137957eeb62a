"""The training loop, on accelerate: written once, used by fine-tuning and distillation.

Distillation plugs in through `loss_fn(model, batch) -> loss`; fine-tuning uses the model's own
loss. Pruning masks are re-applied after every optimizer step so pruned weights stay zero.
The same code runs on one process or several (`accelerate launch` / `torchrun`): accelerate shards
the batches and averages the gradients; checkpoints are written by the main process only.
"""

from __future__ import annotations

import itertools
import logging
import math
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from compress.errors import Interrupted, StageError
from compress.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from compress.training.sharding import sharded_weights

LossFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
log = logging.getLogger("compress")

# Settings that change which example lands in which step: a checkpoint made under other values
# cannot be continued.
_LAYOUT = ("batch_size", "grad_accum", "epochs", "max_steps", "max_train_samples")


class TrainingFields(BaseModel):
    """Training settings shared by every stage that trains (mixed into their configs)."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Examples per forward pass (per process).")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes' 8-bit / paged AdamW (paged needs a GPU)."
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with linear LR warm-up.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="LR schedule after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate on held-out data every N steps.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without improvement (needs eval_every)."
    )
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save a resumable checkpoint every N steps (continue with --resume)."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 on a GPU that supports it, else fp32. CPU always trains in fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    max_train_samples: int | None = Field(None, gt=0, description="Use at most this many training examples.")
    fsdp: dict[str, Any] | None = Field(
        None, description="GPU only: keyword arguments for accelerate's FullyShardedDataParallelPlugin."
    )
    deepspeed: dict[str, Any] | None = Field(
        None, description="GPU only: a DeepSpeed config (as a mapping) passed to accelerate's DeepSpeedPlugin."
    )
    # "stage", or "distributed" when the recipe's distributed section filled fsdp/deepspeed in, so an
    # error names the field the user wrote.
    _sharding_from: str = PrivateAttr("stage")

    @model_validator(mode="after")
    def _training_combinations(self) -> TrainingFields:
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every (how often to evaluate); set eval_every")
        if self.fsdp is not None and self.deepspeed is not None:
            raise ValueError("fsdp and deepspeed exclude each other; keep one")
        return self


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_step: int | None = None
    peak_memory_bytes: int | None = None
    peak_rss_bytes: int | None = None
    num_processes: int = 1

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "train_seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples / self.seconds, 3) if self.seconds else None,
            "tokens_per_second": round(self.tokens / self.seconds, 3) if self.seconds else None,
            "final_loss": self.loss_curve[-1][1] if self.loss_curve else None,
            "loss_curve": [list(x) for x in self.loss_curve],
            "eval_curve": [list(x) for x in self.eval_curve],
            "stopped_early": self.stopped_early,
            "resumed_from_step": self.resumed_from_step,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "num_processes": self.num_processes,
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


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainingFields) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[settings.optimizer]
    return cls(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _accelerator(settings: TrainingFields, device: str):
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {}
    if settings.fsdp is not None:
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**settings.fsdp)
    if settings.deepspeed is not None:
        from accelerate import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=settings.deepspeed)
    return Accelerator(mixed_precision=_mixed_precision(settings.mixed_precision, device),
                       gradient_accumulation_steps=settings.grad_accum, cpu=device == "cpu", **kwargs)


def _epoch_loader(accelerator: Any, dataset: Any, collate: Callable, batch_size: int, seed: int, epoch: int):
    """A fresh, prepared loader whose order depends only on (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one."""
    from torch.utils.data import DataLoader

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, sampler=order,
                                                      collate_fn=collate))


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
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train `model` in place on `dataset`; returns the curves and throughput figures.

    With `checkpoint_dir` and `settings.checkpoint_every`, a checkpoint is written every N steps;
    `resume=True` continues from it (weights, optimizer, scheduler, RNG, data position). A non-finite
    loss stops training with a StageError; the last good state is then saved to `checkpoint_dir`.
    When `stop` is set (Ctrl-C), training saves a checkpoint at the next step boundary and raises
    `Interrupted`.
    """
    from accelerate import skip_first_batches
    from accelerate.utils import gather_object, set_seed
    from transformers import get_scheduler

    set_seed(seed)
    accelerator = _accelerator(settings, device)
    if settings.max_train_samples:
        dataset = dataset.select(range(min(settings.max_train_samples, len(dataset))))
    batches_per_epoch = math.ceil(math.ceil(len(dataset) / settings.batch_size) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / settings.grad_accum))
    total_steps = settings.max_steps or max(1, math.ceil(steps_per_epoch * settings.epochs))

    trainable, trainable_names = _trainable(model, settings, label)
    optimizer = make_optimizer(trainable, settings)
    # accelerate steps a prepared scheduler once per process at each optimizer step, so the
    # schedule is laid out in those units.
    ticks = accelerator.num_processes
    scheduler = get_scheduler(settings.scheduler, optimizer,
                              num_warmup_steps=int(settings.warmup_ratio * total_steps) * ticks,
                              num_training_steps=total_steps * ticks)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    result = TrainResult(num_processes=accelerator.num_processes)
    layout = {k: getattr(settings, k) for k in _LAYOUT} | {"num_processes": accelerator.num_processes}
    ckpt = load_checkpoint(checkpoint_dir) if (resume and checkpoint_dir) else None
    pos = _Position()
    if ckpt is not None:
        if ckpt[2]["layout"] != layout:
            raise StageError(f"{label}: cannot resume from {checkpoint_dir}: it was made with {ckpt[2]['layout']}, "
                             f"this run uses {layout}; restore those settings, or delete the folder to start over")
        pos = _restore(ckpt, accelerator, model, optimizer, scheduler, settings.lr, result)
        log.info("%s: resumed from the checkpoint at step %d", label, result.steps)

    def checkpoint(batches_in_epoch: int) -> None:
        if checkpoint_dir is None:
            return
        rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
        if accelerator.is_main_process:
            unwrapped = dict(accelerator.unwrap_model(model).named_parameters())
            save_checkpoint(checkpoint_dir, {n: unwrapped[n] for n in trainable_names}, optimizer.state_dict(), {
                "layout": layout, "steps": result.steps, "epoch": pos.epoch, "batches_in_epoch": batches_in_epoch,
                "seconds": pos.elapsed + time.perf_counter() - start, "samples": result.samples,
                "tokens": result.tokens, "loss_curve": result.loss_curve, "eval_curve": result.eval_curve,
                "best": pos.best, "since_best": pos.since_best, "scheduler": scheduler.state_dict(), "rng": rngs})
        accelerator.wait_for_everyone()

    progress = _progress(total_steps, label, show_progress and accelerator.is_main_process)
    progress.update(result.steps)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.train()
    running, micro = torch.zeros((), device=accelerator.device), 0
    while result.steps < total_steps and not result.stopped_early:
        loader = _epoch_loader(accelerator, dataset, collate, settings.batch_size, seed, pos.epoch)
        batches_in_epoch = pos.skip_batches
        if pos.skip_batches:
            loader = skip_first_batches(loader, pos.skip_batches)
            pos.skip_batches = 0
        batches = iter(loader)
        first = next(batches, None)
        if pos.pending_rng is not None:
            # Starting a DataLoader iterator (at its first batch) draws from the global RNG, so the
            # saved state is restored after that, where the uninterrupted run stood.
            set_rng_state(pos.pending_rng)
            pos.pending_rng = None
        for batch in itertools.chain([first], batches) if first is not None else ():
            batches_in_epoch += 1
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                bad = torch.tensor(float(not torch.isfinite(loss)), device=accelerator.device)
                if accelerator.num_processes > 1:  # every rank must stop together
                    bad = accelerator.reduce(bad, "sum")
                if bad > 0:
                    progress.close()
                    _stop_on_bad_loss(loss, result.steps, label, checkpoint, batches_in_epoch - 1 - micro,
                                      checkpoint_dir)
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += loss.detach()
            micro += 1
            _count(result, batch, accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            if masks:
                apply_masks(accelerator.unwrap_model(model), masks)
            result.steps += 1
            avg = running / micro
            if accelerator.num_processes > 1:
                avg = accelerator.reduce(avg, "mean")
            avg = float(avg)
            running, micro = torch.zeros((), device=accelerator.device), 0
            result.loss_curve.append((result.steps, round(avg, 5)))
            progress.update(1)
            progress.set_postfix(loss=f"{avg:.4f}")
            if evaluate and settings.eval_every and result.steps % settings.eval_every == 0:
                model.eval()
                metrics = evaluate(accelerator.unwrap_model(model))
                model.train()
                result.eval_curve.append((result.steps, metrics))
                result.stopped_early = pos.patience_ran_out(metrics.get(eval_metric), eval_metric,
                                                            settings.early_stopping_patience)
            done = result.steps >= total_steps or result.stopped_early
            if settings.checkpoint_every and result.steps % settings.checkpoint_every == 0 and not done:
                checkpoint(batches_in_epoch)
            if done:
                break
            if stop is not None and stop.is_set():
                progress.close()
                checkpoint(batches_in_epoch)
                saved = " (progress saved)" if checkpoint_dir is not None else ""
                raise Interrupted(f"{label}: interrupted at step {result.steps}{saved}; "
                                  f"rerun with --resume to continue")
        else:
            pos.epoch += 1
    progress.close()
    result.seconds = pos.elapsed + time.perf_counter() - start
    _finish(result, accelerator, model, settings, device, label)
    return result


def _trainable(model: Any, settings: TrainingFields, label: str) -> tuple[list[torch.nn.Parameter], list[str]]:
    """The parameters to train and their names (checkpoints save those only)."""
    if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        # Non-reentrant checkpointing needs no input grads, so frozen embeddings under LoRA work.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise StageError(f"{label}: the model has no trainable parameters")
    names = {id(p): n for n, p in model.named_parameters()}
    return trainable, [names[id(p)] for p in trainable]


def _finish(result: TrainResult, accelerator: Any, model: Any, settings: TrainingFields, device: str,
            label: str) -> None:
    """Peak memory figures; the model back in eval mode, unwrapped, without checkpointing."""
    # ru_maxrss is the process's high-water mark in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result.peak_rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    if device == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated()
    model = accelerator.unwrap_model(model)
    problem = sharded_weights(model)
    if problem is not None:  # every process gets here, so all stop with the same error
        raise StageError(f"{label}: {problem} after training; compress saves whole weights only, so the stage "
                         f"would save a model without them — train with plain data parallelism or DeepSpeed ZeRO-1/2")
    model.eval()
    if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    accelerator.free_memory()


@dataclass
class _Position:
    """Where training stands beyond the step count: what a checkpoint saves and a resume restores."""

    epoch: int = 0
    skip_batches: int = 0  # batches of the current epoch already trained before a resume
    elapsed: float = 0.0   # seconds trained before a resume
    pending_rng: Any = None  # this process's RNG state, restored once the first batch is drawn
    best: float | None = None
    since_best: int = 0

    def patience_ran_out(self, score: float | None, metric: str, patience: int | None) -> bool:
        """Record an evaluation; True once `patience` evaluations in a row did not improve on the best."""
        if score is None or not patience:
            return False
        lower_is_better = "loss" in metric or metric == "perplexity"
        better = self.best is None or (score < self.best if lower_is_better else score > self.best)
        self.best, self.since_best = (score, 0) if better else (self.best, self.since_best + 1)
        return self.since_best >= patience


def _restore(ckpt: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]], accelerator: Any, model: Any,
             optimizer: Any, scheduler: Any, lr: float, result: TrainResult) -> _Position:
    """Weights, optimizer, schedule, curves and position from a checkpoint (its layout already checked)."""
    weights, opt_state, state = ckpt
    params = dict(accelerator.unwrap_model(model).named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])
    # A changed lr (e.g. after a NaN) wins over the checkpoint's; the schedule's position is kept.
    scheduler.scheduler.base_lrs = [lr] * len(scheduler.scheduler.base_lrs)
    for group, group_lr in zip(optimizer.param_groups, scheduler.scheduler.get_lr(), strict=False):
        group["lr"] = group_lr
    result.steps, result.samples, result.tokens = state["steps"], state["samples"], state["tokens"]
    result.loss_curve = [tuple(x) for x in state["loss_curve"]]
    result.eval_curve = [tuple(x) for x in state["eval_curve"]]
    result.resumed_from_step = result.steps
    return _Position(epoch=state["epoch"], skip_batches=state["batches_in_epoch"], elapsed=state["seconds"],
                     pending_rng=state["rng"][accelerator.process_index], best=state["best"],
                     since_best=state["since_best"])


def _count(result: TrainResult, batch: dict[str, torch.Tensor], processes: int) -> None:
    """Samples and real (unpadded) tokens seen, over all processes."""
    result.samples += batch["input_ids"].shape[0] * processes
    result.tokens += processes * (
        int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())


def _stop_on_bad_loss(loss: torch.Tensor, steps: int, label: str, checkpoint: Callable[[int], None],
                      batches_done: int, checkpoint_dir: Path | None) -> None:
    # The weights still hold the state after the last good optimizer step (the bad loss has not been
    # back-propagated), so that state is what gets saved.
    kept = ""
    if checkpoint_dir is not None:
        checkpoint(batches_done)
        kept = (f" The last good state (step {steps}) is saved in {checkpoint_dir}; fix the setting and "
                f"rerun with --resume to continue from it.")
    raise StageError(
        f"{label}: the loss became {loss.item()} at step {steps + 1}; training stopped.{kept} "
        f"Try a lower lr, mixed_precision: no (fp32), or bf16 instead of fp16"
    )


def _progress(total: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    # Quiet in CI logs and pipes: a progress bar only on a terminal.
    return tqdm(total=total, desc=label, disable=not (enabled and sys.stderr.isatty()), leave=False)


__all__ = ["LossFn", "TrainResult", "TrainingFields", "apply_masks", "make_optimizer", "train"]
