"""Compose stage: one LoRA adapter per task on one base, then combined (peft's TIES, DARE, linear, cat,
SVD) or kept switchable; every task is evaluated with its own adapter and with the combination.

A stage of its own rather than a finetune option: finetune's merge policies, masks, QLoRA reloads and
output formats are about one adapter on one data set, while this stage owns several data sets, several
heads, a table of task x {single, composed} and a retention check. It reuses finetune's LoRA method (the
same peft config and default targets) and the shared training entry. LoRA only: peft's
`add_weighted_adapter` combines LoRA adapters.

What leaves the stage: the model after it is the recipe's own task (the task without `data`) run by the
combined adapter (or, with `combine: switch`, by its own adapter), merged into the base, so later stages
and the run's evaluations see that task. Every adapter is written as a plain PEFT folder under
`<run>/adapters/<stage>/`: `tasks/<task>/` (each task's own) and `composed/<task>/` (the combined body
with the task's head), with `compose.json` naming each task's labels.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.errors import DataError, StageError
from compress.registry import StageConfig, StageResult, register_stage
from compress.specs import DataSpec
from compress.stages import compose_peft as cp
from compress.stages.compose_finished import load_finished, save_finished, settings_key
from compress.training import TrainingFields
from compress.training import adapters as ad

Combination = Literal["switch", "linear", "cat", "svd", "ties", "ties_svd", "dare_ties", "dare_linear",
                      "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"]
# peft trims each task's update to this share of its largest entries for these combinations.
NEEDS_DENSITY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                 "magnitude_prune", "magnitude_prune_svd")
USES_SIGN = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ComposeTask(BaseModel):
    """One task: its name, its data (the recipe's `data` schema) and its weight in the combination."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Task name (a folder name: letters, digits, . _ -).")
    data: DataSpec | None = Field(None, description="The task's data, same fields as the recipe's `data`; "
                                                    "leave it out for the recipe's own task (exactly one).")
    weight: float = Field(1.0, description="The task's weight in the combination (negative subtracts).")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not _TASK_NAME.match(value):
            raise ValueError(f"{value!r} is not a folder name; use letters, digits, '.', '_' or '-'")
        return value


class Compose(StageConfig, TrainingFields):
    """Train one LoRA adapter per task on the same base and combine them (TIES, DARE, linear, cat, SVD) or
    keep them switchable; each task is evaluated with its own adapter and with the combination."""

    type: Literal["compose"] = "compose"
    tasks: list[ComposeTask] = Field(description="Two or more tasks; exactly one leaves out `data` (the "
                                                 "recipe's task, which the run's evaluations measure).")
    rank: int = Field(8, gt=0, description="LoRA rank of every task adapter (linear/TIES/DARE need one rank).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(None, description="Modules to adapt; default: every linear layer "
                                                               "except the head.")
    combine: Combination = Field(
        "ties", description="peft's add_weighted_adapter combination_type, or `switch` (no combination: each "
                            "task keeps its own adapter). linear/ties/dare_* combine the LoRA factors A and B "
                            "separately; the *_svd variants combine the full updates B·A and refactor them "
                            "by SVD to the rank; cat stacks the factors (exact sum, rank x tasks).")
    density: float | None = Field(None, gt=0, le=1, description="Share of each task's update kept (TIES, "
                                                                "DARE, magnitude_prune); required by those.")
    majority_sign: Literal["total", "frequency"] | None = Field(
        None, description="TIES sign election: by total magnitude (peft's default) or by count.")
    min_retained: float | None = Field(
        0.95, gt=0, le=1, description="Each task's composed score must keep this share of its single-adapter "
                                      "score (accuracy; perplexity inverted), else the stage fails; null: "
                                      "only reported.")

    @model_validator(mode="after")
    def _coherent(self) -> Compose:
        names = [t.name for t in self.tasks]
        if len(self.tasks) < 2:
            raise ValueError("tasks: composing needs two or more tasks; add a task (name and data) or use "
                             "type: finetune for one")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"tasks: names must differ ({', '.join(dupes)} repeated); rename them")
        own = [t.name for t in self.tasks if t.data is None]
        if len(own) != 1:
            raise ValueError(f"tasks: exactly one task leaves out `data` (it trains on the recipe's data, which "
                             f"the run's evaluations measure); found {len(own)}"
                             + (f" ({', '.join(own)}); give the others their data" if own else
                                "; remove `data` from the task that uses the recipe's data section"))
        if self.combine in NEEDS_DENSITY and self.density is None:
            raise ValueError(f"density: combine: {self.combine} trims each task's update and needs density "
                             f"(the share kept, e.g. 0.5)")
        if self.combine not in NEEDS_DENSITY and self.density is not None:
            raise ValueError(f"density: combine: {self.combine} keeps every entry; remove density or use ties, "
                             f"dare_ties or dare_linear")
        if self.majority_sign is not None and self.combine not in USES_SIGN:
            raise ValueError(f"majority_sign: only ties/dare_ties elect a sign (combine is {self.combine}); "
                             f"remove majority_sign")
        if self.combine == "switch" and any(t.weight != 1.0 for t in self.tasks):
            raise ValueError("tasks: combine: switch runs each task with its own adapter, so a task weight has no "
                             "effect; remove the weights or pick a combination")
        for name in ("fsdp", "deepspeed"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: compose trains its task adapters one after another on one process; "
                                 f"remove {name}")
        if self.combine != "switch" and not any(t.weight for t in self.tasks):
            raise ValueError("tasks: every task weight is 0, so the combination is empty; give a task weight: 1")
        return self


def _load_task_data(task: ComposeTask, bundle_task: str, ctx: RunContext) -> Any:
    from compress.data import load_data

    if task.data is None:
        return ctx.require_data("compose")
    return load_data(task.data, bundle_task, seed=ctx.seed)


def check_compose(bundle: ModelBundle, config: Compose, ctx: RunContext) -> list[str]:
    """Model- and data-dependent mistakes, found before any training."""
    problems: list[str] = []
    if ad.count_bnb(bundle.model):
        problems.append("type: compose trains float LoRA adapters and merges the combination into the base, "
                        "which a bitsandbytes-quantized base cannot take; compose before quantize")
    if bundle.masks:
        problems.append("type: combined task updates (TIES/DARE/linear) would move the pruned weights; compose "
                        "before prune")
    if bundle.format != "hf":
        problems.append(f"type: compose needs a plain Hugging Face base (this one is {bundle.format!r}); compose "
                        f"before export-like stages or merge the earlier adapter")
    if config.target_modules:
        problems += ad.check_targets(bundle.model, config.target_modules)
    for i, task in enumerate(config.tasks):
        if task.data is None:
            continue
        if bundle.task == "sequence-classification" and not task.data.label_column:
            problems.append(f"tasks[{i}].data.label_column: task {task.name!r} needs a label column to classify")
            continue
        try:
            _load_task_data(task, bundle.task, ctx)
        except DataError as exc:
            problems.append(f"tasks[{i}].{exc}")
    return problems


def _score(metrics: dict[str, float], task: str) -> tuple[str, float]:
    key = "accuracy" if task == "sequence-classification" else "perplexity"
    return key, metrics[key]


def retention(single: float, composed: float, metric: str) -> float:
    """The share of the single-adapter score the composed model keeps (perplexity: lower is better)."""
    if metric == "perplexity":
        return single / composed if composed else 0.0
    return composed / single if single else 1.0


def check_retention(rows: list[dict[str, Any]], min_retained: float | None, label: str) -> None:
    """StageError naming every task whose composed score keeps less than `min_retained` of its single one."""
    if min_retained is None:
        return
    bad = [r for r in rows if r.get("retained") is not None and r["retained"] < min_retained]
    if bad:
        detail = "; ".join(f"{r['task']}: {r['metric']} {r['composed']:.4f} composed vs {r['single']:.4f} with its "
                           f"own adapter ({r['retained']:.1%} kept)" for r in bad)
        raise StageError(f"{label}: the composed adapter keeps less than min_retained={min_retained:g} of the "
                         f"single-task score — {detail}. The adapters are saved; try another combine or density, "
                         f"task weights, or set min_retained: null to only report it")


def run_compose(bundle: ModelBundle, config: Compose, ctx: RunContext) -> StageResult:
    from peft import get_peft_model

    from compress.data import pad_collate
    from compress.stages.finetune import check_merge, method_of
    from compress.stages.finetune_methods import Lora
    from compress.training.entry import held_out_evaluator, train_in_stage

    tokenizer, task_kind = bundle.tokenizer, bundle.task
    lora = Lora(rank=config.rank, alpha=config.alpha, dropout=config.dropout, target_modules=config.target_modules)
    models: dict[str, Any] = {}
    evaluators: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for task in config.tasks:
        data = _load_task_data(task, task_kind, ctx)
        base = cp.task_base(bundle.model, data.label_names, reuse=task.data is None, seed=ctx.seed)
        # Every task's adapter starts from the same seed, so the LoRA factors A start equal: peft's
        # factor-wise TIES/DARE then compare updates made from one starting point.
        torch.manual_seed(ctx.seed)
        model = get_peft_model(base, method_of(lora).peft_config(lora, base, task_kind))  # type: ignore[misc]
        evaluate = held_out_evaluator(data.tokenized("eval", tokenizer), tokenizer, task_kind, device=ctx.device,
                                      num_labels=data.num_labels)
        # One checkpoint folder and one progress label per task, so a resumed run continues the right one.
        task_ctx = dataclasses.replace(ctx, work_dir=ctx.work_dir / task.name)  # type: ignore[operator]
        key, finished_dir = settings_key(config, task.name, ctx.seed), task_ctx.work_dir / "finished"
        row = load_finished(model, key, finished_dir) if ctx.resume else None
        if row is not None:
            ctx.logger.info("%s: task %s finished before the run stopped; its trained adapter is reused",
                            config.label(), task.name)
        else:
            result = train_in_stage(model, data.tokenized("train", tokenizer), pad_collate(tokenizer),
                                    config.model_copy(update={"name": f"{config.label()}[{task.name}]"}), task_ctx,
                                    task=task_kind, evaluate=evaluate)
            metric, single = _score(evaluate(model), task_kind)
            row = {"task": task.name, "labels": data.label_names, "metric": metric, "single": round(single, 6),
                   "weight": task.weight, "steps": result.steps, "train_seconds": round(result.seconds, 3),
                   "final_loss": result.loss_curve[-1][1] if result.loss_curve else None}
            if ctx.is_main_process:  # one process writes; a resume reads it on every rank
                save_finished(model, row, key, finished_dir)
        rows.append(row)
        models[task.name], evaluators[task.name] = model, evaluate

    composed_config = None
    if config.combine != "switch":
        first = next(iter(models.values()))
        torch.manual_seed(ctx.seed)  # DARE drops entries at random: the same run, the same combination
        composed_config, body = cp.combine(
            bundle.model, {name: cp.body_state(m) for name, m in models.items()}, first.peft_config[cp.SINGLE],
            [t.weight for t in config.tasks], config.combine, config.density, config.majority_sign)
        for row in rows:
            model = models[row["task"]]
            cp.add_composed(model, composed_config, body)
            row["composed"] = round(_score(evaluators[row["task"]](model), task_kind)[1], 6)
            row["retained"] = round(retention(row["single"], row["composed"], row["metric"]), 6)

    folder = ctx.artifact_dir("adapters")
    if ctx.is_main_process:  # one process writes
        _write_adapters(folder, models, rows, config, bundle)
    check_retention(rows, config.min_retained, config.label())

    own = next(t.name for t in config.tasks if t.data is None)
    model = models[own]
    rows_by_task = {r["task"]: r for r in rows}
    probe = ctx.require_data("compose").tokenized("eval", tokenizer)
    before = cp.probe_logits(model, probe, tokenizer, ctx.device)
    merged = cp.merge_active(model)
    facts: dict[str, Any] = check_merge(before, cp.probe_logits(merged, probe, tokenizer, ctx.device), "merge",
                                        False, config.label())
    for p in merged.parameters():
        p.requires_grad_(False)
    facts.update({
        "combine": config.combine, "density": config.density, "min_retained": config.min_retained,
        "tasks": len(rows), "recipe_task": own, "adapters_dir": str(folder),
        "composed_rank": getattr(composed_config, "r", None),
        "own_task_composed": rows_by_task[own].get("composed"), "own_task_single": rows_by_task[own]["single"],
        "composition": rows,
    })
    out = bundle.replace(model=merged)
    out.record("compose", config.model_dump(mode="json"), **{k: v for k, v in facts.items() if k != "composition"})
    return StageResult(out, facts, [folder])


def _write_adapters(folder: Any, models: dict[str, Any], rows: list[dict[str, Any]], config: Compose,
                    bundle: ModelBundle) -> None:
    """tasks/<task>/ and composed/<task>/ as plain PEFT folders, and compose.json describing them."""
    from compress.io import write_json_atomic

    index: dict[str, Any] = {"base_model": getattr(bundle.model.config, "_name_or_path", None),
                             "task_type": bundle.task, "combine": config.combine, "density": config.density,
                             "tasks": {}}
    for row in rows:
        model = models[row["task"]]
        cp.save_adapter(model, cp.SINGLE, folder / "tasks" / row["task"])
        entry = {"labels": row["labels"], "num_labels": len(row["labels"]) if row["labels"] else None,
                 "weight": row["weight"], "adapter": f"tasks/{row['task']}"}
        if config.combine != "switch":
            cp.save_adapter(model, cp.COMPOSED, folder / "composed" / row["task"])
            entry["composed_adapter"] = f"composed/{row['task']}"
        index["tasks"][row["task"]] = entry
    write_json_atomic(folder / "compose.json", index)


register_stage(Compose, run_compose, check=check_compose)

__all__ = ["Compose", "ComposeTask", "check_compose", "check_retention", "retention", "run_compose"]
