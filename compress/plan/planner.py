"""`plan_recipe`: a recipe's peak memory per device, stage by stage, from the model config alone,
and whether it fits the devices here (CPU RAM, CUDA GPUs) or a device size the user names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from compress.errors import RecipeError
from compress.modelconfig import derived_config
from compress.plan.memory import Weights, inference_activations
from compress.plan.shapes import Shape, model_shape
from compress.plan.stages import (
    Setting,
    Sharding,
    StagePlan,
    plan_lowrank,
    plan_prune,
    plan_quantize,
    plan_training,
    stage_sharding,
)
from compress.recipe import Recipe

SHARD_MODES = ("none", "zero2", "zero3", "fsdp")


@dataclass
class Device:
    name: str
    total: int
    available: int


@dataclass
class MemoryPlan:
    """What `compress plan` prints: one row per phase, the devices, and what fits where."""

    model: str
    params: int
    dtype: str
    device: str
    sharding: Sharding
    stages: list[StagePlan]
    devices: list[Device]
    accelerate: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max((s.peak for s in self.stages), default=0)

    def fits(self, plan: StagePlan) -> bool | None:
        """Whether `plan` fits every device it runs on (None: no such device here to check)."""
        if not self.devices:
            return None
        return plan.peak <= min(d.total for d in self.devices)


def devices_here(kind: str) -> list[Device]:
    """CPU RAM (psutil) or each CUDA GPU present."""
    if kind == "cuda":
        found = []
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, total = torch.cuda.mem_get_info(index)
            found.append(Device(f"cuda:{index} {torch.cuda.get_device_name(index)}", total, free))
        return found
    import psutil

    memory = psutil.virtual_memory()
    return [Device("cpu RAM", memory.total, memory.available)]


def _target_device(recipe: Recipe, device: str | None) -> str:
    if device is not None:
        return device
    if recipe.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return recipe.device


def _shape(config: Any, task: str, where: str) -> Shape:
    try:
        return model_shape(config, task)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for configs it cannot build
        raise RecipeError(f"{where}: cannot build this model from its config to count its parameters "
                          f"({type(exc).__name__}: {exc}); give a transformers model folder") from None


def _student_shape(stage: Any, config: Any, incoming: Shape, task: str, where: str) -> Shape:
    from compress.loading import load_config
    from compress.recipe import ModelSpec

    if stage.student_model is not None:
        return _shape(load_config(ModelSpec(path=stage.student_model)), task, f"{where}.student_model")
    layers = getattr(config, "num_hidden_layers", None)
    if stage.keep_every is not None and layers:
        return _shape(derived_config(config, {"num_hidden_layers": layers // stage.keep_every}), task, where)
    if stage.keep_layers is not None:
        return _shape(derived_config(config, {"num_hidden_layers": len(stage.keep_layers)}), task, where)
    if stage.student_config is not None:
        return _shape(derived_config(config, stage.student_config), task, f"{where}.student_config")
    return incoming  # a teacher is named: the incoming model is the student


def _teacher(stage: Any, shape: Shape, weights: Weights, task: str, where: str) -> tuple[Shape, int]:
    """The teacher's shape and weight bytes: the incoming model, or a model folder / Hub id's config
    (an earlier stage's output, `stage:N`, is planned as the incoming model)."""
    from compress.loading import load_config
    from compress.recipe import ModelSpec

    if stage.teacher is None or stage.teacher.startswith("stage:"):
        return shape, weights.total()
    teacher = _shape(load_config(ModelSpec(path=stage.teacher)), task, where)
    return teacher, teacher.total * weights.float_bytes


def plan_recipe(recipe: Recipe, *, device: str | None = None, world_size: int = 1, shard: str = "none",
                bf16_supported: bool | None = None, check_devices: bool = True) -> MemoryPlan:
    """Estimate each stage's peak memory per device from `recipe.model.path`'s config (no weights).

    `device` (cpu / cuda) defaults to the recipe's; `world_size` and `shard` (none, zero2, zero3, fsdp)
    describe a distributed run (a stage's own `deepspeed` / `fsdp` settings are honoured when `shard`
    is none). `bf16_supported` is the target GPU's (default: ask torch; a plan for GPUs made on a CPU
    machine says True).
    """
    from compress.loading import load_config, resolve_dtype, resolve_task

    if shard not in SHARD_MODES:
        raise RecipeError(f"--shard: {shard!r} is not one of {', '.join(SHARD_MODES)}")
    if world_size < 1:
        raise RecipeError(f"--world-size: {world_size} must be 1 or more")
    if shard != "none" and world_size == 1:
        raise RecipeError(f"--shard {shard}: sharding needs more than one device; set --world-size N")
    target = _target_device(recipe, device)
    if bf16_supported is None and target == "cuda" and not torch.cuda.is_available():
        bf16_supported = True
    task = resolve_task(recipe.model)
    config = load_config(recipe.model)
    dtype = resolve_dtype(recipe.model, config, target, bf16_supported)
    shape = base = _shape(config, task, "model.path")
    sharding = Sharding(world_size, shard)
    setting = Setting(target, recipe.data.max_length, recipe.data.calibration_samples)
    weights = Weights(shape, dtype, {}, {})
    rows: list[StagePlan] = []
    placed = _placement_row(recipe, task, target)
    if placed is not None:  # model.device_map offloads: the run only evaluates (its stages are refused)
        row = _eval_row("evaluate baseline", recipe, weights, shape)
        row.parts = {**placed.parts, "activations": row.parts["activations"]}
        row.notes += placed.notes
        rows.append(row)
    elif recipe.eval.baseline:
        rows.append(_eval_row("evaluate baseline", recipe, weights, shape))
    for index, stage in enumerate(recipe.stages if placed is None else [], start=1):
        kind = stage.stage_type()
        label = f"{index} {kind}"
        if kind == "finetune":
            label += f" ({stage.method})"
            rows.append(plan_training(label, stage, weights, shape, setting, stage_sharding(stage, sharding)))
            if stage.method == "qlora" and stage.merge == "dequantize-merge-requantize":
                weights = Weights(shape, dtype, dict.fromkeys(shape.linears, "nf4"), {},
                                  double_quant=stage.double_quant, masked=weights.masked)
        elif kind == "distill":
            student = _student_shape(stage, config, shape, task, f"stages[{index - 1}]")
            row = plan_training(label, stage, Weights(student, dtype, {}, {}), student, setting,
                                stage_sharding(stage, sharding))
            row.parts = {f"student {k}": v for k, v in row.parts.items()}
            teacher, teacher_weights = _teacher(stage, shape, weights, task, f"stages[{index - 1}].teacher")
            row.parts["teacher weights"] = teacher_weights
            row.parts["teacher forward"] = inference_activations(
                teacher, stage.batch_size, setting.seq, 2 if target == "cuda" else weights.float_bytes, loss=False)
            if stage.hidden_loss != "none":
                row.parts["teacher hidden states"] = (teacher.layers + 1) * stage.batch_size * setting.seq \
                    * teacher.hidden * weights.float_bytes
            row.notes.insert(0, f"student: {student.total:,} parameters; teacher frozen (no gradients)")
            rows.append(row)
            shape, weights = student, Weights(student, dtype, {}, {})
        elif kind == "prune":
            row, masked = plan_prune(label, stage, weights, shape, setting)
            rows.append(row)
            weights.masked = max(weights.masked, masked)
        elif kind == "quantize":
            row, formats, groups = plan_quantize(label + f" ({stage.scheme})", stage, weights, shape, setting)
            rows.append(row)
            weights = Weights(shape, dtype, formats, groups, double_quant=getattr(stage, "double_quant", True),
                              masked=weights.masked)
        elif kind == "lowrank":
            row, kept = plan_lowrank(label, stage, weights, shape)
            rows.append(row)
            weights = Weights(shape, dtype, weights.formats, weights.group, weights.double_quant,
                              lowrank=kept, masked=weights.masked)
        else:
            row = StagePlan(label, {"weights": weights.total()})
            row.notes.append(f"{kind}: planned as the model's weights only")
            rows.append(row)
    if recipe.eval.after_each_stage and recipe.stages and placed is None:
        rows.append(_eval_row("evaluate final", recipe, weights, shape))
    notes = []
    if any(s.stage_type() in ("prune", "quantize", "lowrank") for s in recipe.stages) and world_size > 1:
        notes.append("prune / quantize / lowrank run once, on one device, with the whole model")
    return MemoryPlan(model=recipe.model.path, params=base.total, dtype=dtype, device=target, sharding=sharding,
                      stages=rows, devices=devices_here(target) if check_devices else [],
                      accelerate=accelerate_estimate(base), notes=notes)


def accelerate_estimate(shape: Shape) -> dict[str, int]:
    """accelerate's `estimate-memory` figures for the same meta model (its functions, as its CLI needs the
    Hub): the fp32 size and largest layer from `calculate_maximum_sizes`, and `estimate_training_usage`'s
    "Training using Adam" (the largest of its model / gradients / optimizer / step terms, batch size 1)."""
    from accelerate.commands.estimate import estimate_training_usage

    fp32 = shape.accelerate_total_bytes
    return {"total_fp32": fp32, "total_16bit": fp32 // 2, "largest_layer_fp32": shape.accelerate_largest_layer_bytes,
            "adam_fp32": max(estimate_training_usage(fp32, "float32").values()),
            "adam_16bit": max(estimate_training_usage(fp32, "bfloat16").values())}


def _placement_row(recipe: Recipe, task: str, target: str) -> StagePlan | None:
    """The weights an offloading model.device_map keeps in memory, or None when it offloads nothing."""
    from compress.placement import held_bytes, in_place, offloaded, plan_device_map

    device_map = plan_device_map(recipe.model, task, target)
    if device_map is None or in_place(device_map, target):
        return None
    kept, largest = held_bytes(recipe.model, task, target, device_map)
    row = StagePlan("placement", {"weights held": kept, "largest offloaded, read in": largest})
    row.notes.append(f"model.device_map offloads {len(offloaded(device_map, target))} of {len(device_map)} placed "
                     f"modules; compress run evaluates such a model only (stages are refused), so none is planned")
    return row


def _eval_row(label: str, recipe: Recipe, weights: Weights, shape: Shape) -> StagePlan:
    """An eval point: the weights and the larger of the accuracy pass and the speed test (no grad)."""
    row = StagePlan(label, {"weights": weights.total()})
    act = weights.float_bytes
    passes = []
    if recipe.eval.accuracy:
        passes.append(inference_activations(shape, recipe.eval.eval_batch_size, recipe.data.max_length, act,
                                            loss=True))
    if recipe.eval.speed:
        passes.append(inference_activations(shape, recipe.eval.batch_size, recipe.eval.seq_len, act, loss=False))
    row.parts["activations"] = max(passes, default=0)
    row.notes.append(f"accuracy batch {recipe.eval.eval_batch_size} x {recipe.data.max_length}, speed batch "
                     f"{recipe.eval.batch_size} x {recipe.eval.seq_len}")
    return row
