"""Where the base model's modules live when `model.device_map` is set: the map computed before loading,
what it offloads, what a run can still do with it, and reading offloaded weights one module at a time.

The map is computed here, from the config on the meta device, with accelerate's own placement
(`infer_auto_device_map`, `get_balanced_memory`), and the computed mapping is what transformers loads with:
the pre-flight checks and the load then see the same placement, and a refusal comes before any weight
is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from compress.specs import ModelSpec


def max_memory(spec: ModelSpec) -> dict[int | str, int | str] | None:
    """model.max_memory with GPU indices as ints, as accelerate wants them."""
    if spec.max_memory is None:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in spec.max_memory.items()}


def plan_device_map(spec: ModelSpec, task: str, device: str) -> dict[str, int | str] | None:
    """The module -> device mapping the model loads with, or None without model.device_map. A named
    mapping is used as given; `auto` / `balanced` / `sequential` are resolved for this machine from the
    config alone (no weights are read)."""
    if spec.device_map is None:
        return None
    if isinstance(spec.device_map, dict):
        named = {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in spec.device_map.items()}
        _check_names(named, spec, task, device)
        return named
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    from compress.loading import compress_output

    if compress_output(spec) is not None:
        return None  # refused by placement_problems: a stage output loads whole
    meta, dtype = _meta_model(spec, task, device)
    no_split = getattr(meta, "_no_split_modules", None) or []
    limits = (get_max_memory(max_memory(spec)) if spec.device_map == "sequential"
              else get_balanced_memory(meta, max_memory=max_memory(spec), no_split_module_classes=no_split,
                                       dtype=dtype))
    placed = infer_auto_device_map(meta, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    return dict(placed)


def _check_names(device_map: dict[str, int | str], spec: ModelSpec, task: str, device: str) -> None:
    """A named map must name real modules and place every weight: refused here, before loading."""
    from compress.errors import RecipeError
    from compress.loading import compress_output

    if compress_output(spec) is not None:
        return  # refused by placement_problems
    meta, _ = _meta_model(spec, task, device)
    modules = dict(meta.named_modules())
    problems = []
    unknown = [k for k in device_map if k and k not in modules]
    if unknown:
        top = ", ".join(name for name, _ in meta.named_children())
        problems.append(f"model.device_map: no module named {', '.join(map(repr, unknown))} in this model (its "
                        f"top-level modules: {top}); `compress plan` or `device_map: auto` shows a valid placement")
    if "" not in device_map:
        left = [t for t in meta.state_dict() if not any(t == k or t.startswith(k + ".") for k in device_map)]
        if left:
            problems.append(f"model.device_map: nothing places {', '.join(left[:4])}{', …' if len(left) > 4 else ''} "
                            f"({len(left)} tensors); map their modules too, or add \"\": DEVICE for the rest")
    if problems:
        raise RecipeError(problems)


def _meta_model(spec: ModelSpec, task: str, device: str) -> tuple[torch.nn.Module, torch.dtype]:
    """The model built from its config on the meta device (no memory, no weights), in its load dtype."""
    from compress.bundle import auto_class
    from compress.loading import load_config, resolve_dtype
    from compress.modelconfig import TORCH_DTYPES

    config = load_config(spec)
    dtype = TORCH_DTYPES[resolve_dtype(spec, config, device)]
    with torch.device("meta"):
        return auto_class(task).from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code), dtype


def held_bytes(spec: ModelSpec, task: str, device: str, device_map: dict[str, int | str]) -> tuple[int, int]:
    """(bytes of the weights the map keeps in memory, bytes of the largest offloaded entry, which is read in
    whole at its forward), from the config alone: what `compress plan` counts for an offloaded base."""
    from accelerate.utils import compute_module_sizes

    meta, dtype = _meta_model(spec, task, device)
    sizes = compute_module_sizes(meta, dtype=dtype)
    moved = set(offloaded(device_map, device))
    kept = sum(sizes.get(name, 0) for name in device_map if name not in moved)
    largest = max((sizes.get(name, 0) for name in moved), default=0)
    return kept, largest


def offloaded(device_map: dict[str, int | str] | None, device: str) -> list[str]:
    """Modules whose weights are not held on a device that computes: on disk, or on the CPU while the
    run computes on a GPU (accelerate then copies them in at every forward)."""
    if not device_map:
        return []
    return [name for name, where in device_map.items() if where == "disk" or (where == "cpu" and device != "cpu")]


def devices_used(device_map: dict[str, int | str] | None) -> list[str]:
    return sorted({str(v) for v in (device_map or {}).values()})


def in_place(device_map: dict[str, int | str] | None, device: str) -> bool:
    """True when the map puts the whole model on the run's own device: the same as no map."""
    def normal(where: int | str) -> str:
        return "cuda" if isinstance(where, int) or str(where).startswith("cuda") else str(where)

    return all(normal(v) == device for v in (device_map or {}).values())


def summary(device_map: dict[str, int | str], device: str) -> str:
    """One line for the report: how many top-level entries sit where."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    placed = ", ".join(f"{n} on {where}" for where, n in sorted(counts.items()))
    moved = offloaded(device_map, device)
    return (f"model.device_map placed the base's modules: {placed}"
            + (f"; {len(moved)} offloaded (read in at every forward)" if moved else ""))


def placement_problems(spec: ModelSpec, device_map: dict[str, int | str] | None, device: str,
                       stages: list[Any], speed: bool, world_size: int) -> list[str]:
    """What a run cannot do with this placement, each naming the field and the fix."""
    from compress.loading import compress_output

    if spec.device_map is not None and compress_output(spec) is not None:
        return [("model.device_map: model.path is a stage output of a compress run, which loads whole (it may "
                "hold compress's own layers); drop model.device_map")]
    if device_map is None or in_place(device_map, device):
        return []
    from compress.loading import gguf_kwargs

    if "disk" in device_map.values() and gguf_kwargs(spec):
        # transformers dequantizes a GGUF whole on load and refuses to offload it to disk.
        return [("model.device_map: a GGUF checkpoint cannot be offloaded to disk (transformers dequantizes it "
                "whole on load); convert it to a safetensors folder first, or raise model.max_memory so nothing "
                "goes to disk")]
    moved = offloaded(device_map, device)
    shown = [name or "the whole model" for name in moved[:3]]
    where = (f"offloads {len(moved)} module(s) ({', '.join(shown)}{', …' if len(moved) > 3 else ''})"
             if moved else f"splits the model across {', '.join(devices_used(device_map))}")
    problems = []
    for index, stage in enumerate(stages):
        problems.append(
            f"stages[{index}] ({stage.stage_type()}): model.device_map {where}; a stage changes weights, which must "
            f"all be in memory on {device} — raise model.max_memory (or drop model.device_map) to run stages, or "
            f"drop the stages to evaluate the model as placed")
    if speed:
        problems.append(f"eval.speed: model.device_map {where}, so a timing would measure weight transfers and "
                        f"the side-by-side pass would load the whole model in one process; set eval.speed: false")
    if world_size > 1:
        problems.append(f"model.device_map: every one of the {world_size} processes would place and load the "
                        f"whole model; device_map is for one process — launch without torchrun/accelerate")
    return problems


def has_offloaded_weights(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def modules_onloaded(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) for every module, its own weights read in from the offload store while the caller
    holds it: an offloaded model can be measured one module at a time, never whole in memory."""
    from accelerate.utils import align_module_device

    for name, module in model.named_modules():
        with align_module_device(module):
            yield name, module
