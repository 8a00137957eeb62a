"""Students: a given model, the teacher with fewer layers (weights copied), or a smaller config.

A student made from the teacher is a fresh model of the teacher's class built from its config with
`num_hidden_layers` lowered, then loaded with the kept layers' weights under new indices, so it is
an ordinary model that `from_pretrained` reloads (no hooks or wrappers left behind).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from compress.bundle import auto_class
from compress.modelconfig import derived_config


def layer_list_name(model: Any) -> str:
    """Dotted name of the ModuleList holding the transformer blocks (bert.encoder.layer, model.layers)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name.split(".")[-1] in (
                "layer", "layers", "h", "blocks"):
            return name
    raise ValueError(f"cannot find the {count} transformer blocks of {type(model).__name__}")


def every_kth(num_layers: int, k: int) -> list[int]:
    """Layers k-1, 2k-1, ...: each kept layer stands for the k layers ending at it, so the top layer
    (the one the head was trained on) is always kept."""
    return list(range(k - 1, num_layers, k))


def _student_config(teacher: Any, keep: list[int]) -> Any:
    changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
    layer_types = getattr(teacher.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == teacher.config.num_hidden_layers:
        changes["layer_types"] = [layer_types[i] for i in keep]  # e.g. sliding/full attention per layer
    return derived_config(teacher.config, changes)


def _kept_state(teacher: Any, keep: list[int]) -> dict[str, Any]:
    """The teacher's weights under the student's names: kept layers renumbered, the rest as they are."""
    prefix = layer_list_name(teacher)
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, value in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    return state


def layers_mismatch(teacher: Any, keep: list[int], task: str) -> str | None:
    """Why the kept layers cannot be copied into a student of the teacher's class, or None.

    Some architectures build one layer unlike the others (ModernBERT's layer 0 has no attention norm,
    the embeddings' norm serves instead), so a layer moved to that position brings weights the
    student has no place for, or lacks ones it needs. Checked on the meta device: no memory used."""
    with torch.device("meta"):
        student = auto_class(task).from_config(_student_config(teacher, keep))
    wanted, given = set(student.state_dict()), set(_kept_state(teacher, keep))
    extra, missing = sorted(given - wanted), sorted(wanted - given)
    if not extra and not missing:
        return None
    what = (f"teacher weight {extra[0]} has no place in the student" if extra
            else f"the student's {missing[0]} has no teacher weight")
    return (f"{type(teacher).__name__}'s layers are not all alike, so teacher layers {keep} cannot be "
            f"renumbered into a {len(keep)}-layer student ({what}; {len(extra) + len(missing)} such "
            f"weights); keep the layers that sit in the positions they land in, e.g. keep_layers "
            f"starting with 0")


def student_from_layers(teacher: Any, keep: list[int], task: str) -> Any:
    """A copy of `teacher` with only the transformer blocks `keep` (0-based, in order)."""
    problem = layers_mismatch(teacher, keep, task)
    if problem is not None:
        raise ValueError(problem)
    with torch.device("cpu"):
        student = auto_class(task).from_config(_student_config(teacher, keep),
                                               dtype=next(teacher.parameters()).dtype)
    student.load_state_dict(_kept_state(teacher, keep), strict=True)
    return student.to(next(teacher.parameters()).device)


def student_from_config(teacher_config: Any, overrides: dict[str, Any], task: str, *, seed: int = 0,
                        teacher: Any = None, meta: bool = False) -> Any:
    """A randomly initialised model of the teacher's class with `overrides` applied to its config.

    Embeddings are copied from `teacher` when their shape allows it (same hidden size), since that
    is free and gives the student a head start. `meta=True` only builds it on the meta device (a
    cheap check that the overrides make a valid model).
    """
    config = derived_config(teacher_config, overrides)
    if meta:
        with torch.device("meta"):
            return auto_class(task).from_config(config)
    torch.manual_seed(seed)
    student = auto_class(task).from_config(config)
    if teacher is not None:
        src, dst = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
        if src.shape == dst.shape:
            with torch.no_grad():
                dst.copy_(src)
        student = student.to(next(teacher.parameters()).device)
    return student


def load_model(path: str, task: str, num_labels: int | None = None, id2label: dict | None = None,
               device: str = "cpu", *, field: str = "teacher") -> tuple[Any, Any, str]:
    """(model, tokenizer, task) from a compress stage folder, a Hugging Face folder or a Hub id,
    through the base model's loader and its safety checks (compress/loading.py).

    A bare encoder given as a classification student gets a new head with the teacher's labels;
    a teacher must bring its own trained head.
    """
    from compress.loading import load_other_model

    labels = [id2label.get(i, id2label.get(str(i), str(i))) for i in range(num_labels)] \
        if task == "sequence-classification" and num_labels and id2label else None
    bundle = load_other_model(path, task, device, field=field, label_names=labels, with_head=field == "teacher")
    return bundle.model, bundle.tokenizer, bundle.task


def default_layer_map(student_layers: int, teacher_layers: int, kept: list[int] | None) -> dict[int, int]:
    """Student layer -> teacher layer (1-based hidden-state indices; 0 is the embeddings).

    A student cut from the teacher matches each kept layer to where it came from; otherwise the
    student's layers are spread evenly over the teacher's, the last matched to the last.
    """
    if kept is not None:
        return {i + 1: k + 1 for i, k in enumerate(kept)}
    return {i: max(1, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)}
