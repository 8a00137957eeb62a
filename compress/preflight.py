"""Pre-flight: what the model's config says a run cannot do, checked before weights load or any folder
is written — sequence lengths against the model's positions, the classifier head against the data's
labels, and the memory the weights (and the largest batch) need against what the machine has.

Each refusal names the recipe field and the fix; the memory check states its numbers and how to
run anyway (an estimate can be wrong, and the user may know better).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from compress.errors import CompressError, RecipeError
from compress.loading import load_config, resolve_dtype
from compress.modelconfig import derived_config
from compress.placement import in_place, placement_problems
from compress.recipe import Recipe
from compress.registry import base_load_plan

log = logging.getLogger("compress")

SKIP_MEMORY_ENV = "COMPRESS_SKIP_MEMORY_CHECK"
# The deepest released transformers have a few hundred layers; far more is a typo, and building such a
# model (even on the meta device, as the distill check does) takes minutes.
MAX_LAYERS = 1000
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# RoBERTa-style models number positions from pad_token_id + 1, so that many are unusable.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer",
                     "mpnet", "ibert", "roberta-prelayernorm"}
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "n_ctx")


class MemoryCheckError(CompressError):
    """The model (by its config) needs more memory than the machine has."""

    exit_code = 2


def check_before_loading(recipe: Recipe, task: str, data: Any, device: str, world_size: int = 1,
                         device_map: dict[str, Any] | None = None) -> None:
    """Every config-level check of the run; raises a CompressError naming the field and the fix.
    `device_map`: the placement the base will load with (compress.placement.plan_device_map)."""
    config = load_config(recipe.model)
    problems = position_problems(config, recipe, task) + head_problems(config, recipe, task, data)
    students = _student_configs(config, recipe)
    problems += [p for where, c in [("model.path", config), *students] for p in _depth_problems(c, where)]
    problems += placement_problems(recipe.model, device_map, device, recipe.stages, recipe.eval.speed, world_size)
    if problems:
        raise RecipeError(problems)
    held_out = len(data.eval) if task == "sequence-classification" and data is not None else None
    check_memory(config, recipe, task, device, students, held_out,
                 weights_in_memory=device_map is None or in_place(device_map, device))


# ---------------------------------------------------------------------------- positions


def max_positions(config: Any) -> tuple[int, str] | None:
    """(usable positions, config key) or None when the config states no limit."""
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value, key
    return None


def position_problems(config: Any, recipe: Recipe, task: str | None = None) -> list[str]:
    limit = max_positions(config)
    if limit is None:
        return []
    usable, key = limit
    spec = recipe.eval
    asked = [("data.max_length", recipe.data.max_length)]
    if spec.speed and (spec.baseline or spec.after_each_stage or spec.side_by_side):
        asked.append(("eval.seq_len", spec.seq_len))  # only the speed test uses it
    problems = []
    generates = spec.speed and spec.side_by_side and spec.generation and task == "causal-lm"
    if generates and spec.prompt_tokens + spec.new_tokens > usable:  # generation runs past the prompt
        problems.append(f"eval.prompt_tokens + eval.new_tokens: {spec.prompt_tokens} + {spec.new_tokens} "
                        f"tokens is more than the model's {usable} positions ({key} in model.path's "
                        f"config); lower them")
    return [f"{field}: {value} tokens is more than the model's {usable} positions ({key} in model.path's "
            f"config); use {field}: {usable} or less" for field, value in asked if value > usable] + problems


# ---------------------------------------------------------------------------- classifier head


def head_problems(config: Any, recipe: Recipe, task: str, data: Any) -> list[str]:
    """A trained classifier head cannot take a different number of classes (its weights do not fit)."""
    names = getattr(data, "label_names", None)
    archs = getattr(config, "architectures", None) or []
    if task != "sequence-classification" or not names:
        return []
    wanted = recipe.model.num_labels or len(names)
    if wanted < len(names):  # load_base_model names that mistake (model.num_labels too small)
        return []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels == wanted:
        return []
    head = f"{config.num_labels} ({_show(list((getattr(config, 'id2label', None) or {}).values()))})"
    if recipe.model.num_labels:
        return [(f"model.num_labels: {wanted}, but model.path's classifier head was trained for {head} and its "
                 f"weights cannot take another count; drop model.num_labels (the data has {len(names)} classes)")]
    return [(f"data.label_column {recipe.data.label_column!r}: {wanted} classes ({_show(names)}), but model.path's "
             f"classifier head was trained for {head}; use data with the head's {config.num_labels} classes, or "
             f"start from a model without a classification head (its base encoder) so a new head is trained")]


def _show(names: list[Any]) -> str:
    shown = ", ".join(str(n) for n in names[:6])
    return shown + (f", … {len(names) - 6} more" if len(names) > 6 else "")


# ---------------------------------------------------------------------------- size and memory


def _student_configs(config: Any, recipe: Recipe) -> list[tuple[str, Any]]:
    """(field, config) of every student a distill stage will build from `student_config`."""
    out = []
    for index, stage in enumerate(recipe.stages):
        changes = getattr(stage, "student_config", None)
        if stage.stage_type() == "distill" and isinstance(changes, dict):
            student = copy.deepcopy(config)
            for key, value in changes.items():
                try:
                    setattr(student, key, value)
                except Exception as exc:  # noqa: BLE001 - the distill stage's own check names bad settings
                    log.debug("student_config.%s not applied to the estimate: %s", key, exc)
            out.append((f"stages[{index}].student_config", student))
    return out


def _layers(config: Any) -> int | None:
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _depth_problems(config: Any, where: str) -> list[str]:
    layers = _layers(config)
    if layers is not None and layers > MAX_LAYERS:
        return [(f"{where}: num_hidden_layers: {layers} is beyond any trained model (the deepest have a few "
                 f"hundred layers) and would take minutes to build; use a real layer count")]
    return []


def estimate_parameters(config: Any, task: str) -> int:
    """Parameter count from the config alone: builds the model with 1 and 2 layers on the meta device
    (no memory, milliseconds) and extrapolates, so a 100,000-layer config costs nothing to size."""
    layers = _layers(config)
    if layers is None or layers <= 2:
        return _count(config, task, layers)
    one, two = _count(config, task, 1), _count(config, task, 2)
    return one + (two - one) * (layers - 1)


def _count(config: Any, task: str, layers: int | None) -> int:
    from compress.bundle import auto_class

    config = derived_config(config, {} if layers is None else {"num_hidden_layers": layers})
    with torch.device("meta"):
        model = auto_class(task).from_config(config)
    return sum(p.numel() for p in model.parameters())


def activation_bytes(config: Any, task: str, batch: int, seq: int, width: int) -> int:
    """A floor on one forward's peak activations (no grad): a layer's hidden states and attention scores,
    plus the logits of a causal LM over every position."""
    hidden = getattr(config, "hidden_size", 0) or 0
    inner = getattr(config, "intermediate_size", 0) or 4 * hidden
    heads = getattr(config, "num_attention_heads", 0) or 1
    vocab = getattr(config, "vocab_size", 0) or 0
    logits = batch * seq * vocab if task == "causal-lm" else 0
    return width * (batch * seq * max(hidden, inner) + batch * heads * seq * seq + logits)


def check_memory(config: Any, recipe: Recipe, task: str, device: str, students: list[tuple[str, Any]],
                 held_out: int | None = None, weights_in_memory: bool = True) -> None:
    """Refuse when the weights (base + largest distill student) and the largest evaluation batch
    cannot fit in the memory the machine has free. `weights_in_memory=False`: model.device_map offloads
    or splits the base, within model.max_memory, so only the batch is checked."""
    if os.environ.get(SKIP_MEMORY_ENV, "") not in ("", "0"):
        log.warning("%s is set: the memory check is skipped", SKIP_MEMORY_ENV)
        return
    dtype = resolve_dtype(recipe.model, config, device)  # `auto` becomes the checkpoint's own dtype
    width = _BYTES[dtype]
    dtype_said = dtype
    if base_load_plan(recipe.stages) is not None:  # the first stage loads the base in NF4 (QLoRA)
        # QLoRA's base loads straight into NF4: half a byte per weight plus its block statistics
        # (one absmax per 64 weights), rounded up to 0.6 to leave room for the float heads.
        width, dtype_said = 0.6, "NF4, as QLoRA loads it"
    try:
        params = estimate_parameters(config, task)
        student, student_field = max(((estimate_parameters(c, task), where) for where, c in students),
                                     default=(0, ""))
    except Exception as exc:  # noqa: BLE001 - an estimate must never be what stops a valid run
        log.debug("memory estimate skipped: %s", exc)
        return
    if not weights_in_memory:
        params = 0  # accelerate placed the base within model.max_memory; what did not fit is offloaded
    weights = (params + student) * width
    speed = (recipe.eval.batch_size, recipe.eval.seq_len) if recipe.eval.speed else (1, 1)
    # The accuracy pass batches the held-out examples (a classifier has one row per example; an LM's
    # blocks are only known after tokenising, so its full batch is assumed).
    rows = min(recipe.eval.eval_batch_size, held_out or recipe.eval.eval_batch_size) if recipe.eval.accuracy else 1
    act_width = _BYTES[dtype]  # activations stay in the compute dtype
    batch = max(activation_bytes(config, task, *speed, act_width),
                activation_bytes(config, task, rows, recipe.data.max_length, act_width))
    need, free = weights + batch, available_memory(device)
    if need <= free:
        return
    parts = [f"the weights: {params:,} parameters × {width} bytes ({dtype_said}) = {_gib(params * width)}"]
    if student:
        parts.append(f"the distill student: {student:,} parameters = {_gib(student * width)}")
    parts.append(f"the largest evaluation batch: at least {_gib(batch)} "
                 f"(eval.batch_size × eval.seq_len, eval.eval_batch_size × data.max_length)")
    # Name the field behind the largest share, since that is the one to change.
    largest = max((params * width, "model.path"), (student * width, student_field),
                  (batch, "eval.batch_size"))[1]
    where = "the GPU" if device == "cuda" else "this machine"
    raise MemoryCheckError(
        f"{largest}: this run needs at least {_gib(need)} of memory — " + "; ".join(parts)
        + f" — but {where} has {_gib(free)} available. Use a smaller model or student (num_hidden_layers, "
        f"hidden_size), model.dtype: bfloat16, or smaller eval batches; to only evaluate a model larger than "
        f"memory, model.device_map: auto offloads what does not fit to disk; if the estimate is wrong, set "
        f"{SKIP_MEMORY_ENV}=1 to run anyway")


def available_memory(device: str) -> int:
    """Bytes free for the run: the GPU's free memory on cuda, else the machine's available RAM."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def _gib(n: int) -> str:
    if n >= 2**28:
        return f"{n / 2**30:,.1f} GiB"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"
