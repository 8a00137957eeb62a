"""Size: parameters, non-zeros, bytes in memory and on disk, average bits per weight."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from compress.io import folder_bytes
from compress.placement import has_offloaded_weights
from compress.report.schema import LayerSize, SizeMetrics


def _logical_numel(tensor: torch.Tensor) -> int:
    # Quantized layers may store packed weights; they expose the logical shape as `quant_shape`
    # (bitsandbytes Params4bit) so a 4-bit weight still counts as one parameter.
    shape = getattr(tensor, "quant_shape", None) or getattr(getattr(tensor, "quant_state", None), "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return tensor.numel()


def _count_nonzero(tensor: torch.Tensor, cache: dict[int, int] | None = None) -> int:
    """Non-zero logical weights. Packed bitsandbytes 4-bit weights are counted on their dequantized
    values (NF4 and FP4 hold an exact zero, so pruned weights stay visible); another packed format
    that cannot be read back is counted as dense. `cache` (by tensor id) lets one measurement
    dequantize each weight once.

    Only parameters are cached: they live as long as the model, so their ids stay theirs. A
    quantized layer's `weight` property builds a new tensor on each access; once freed, its id is
    reused by the next one, and a cached count then belonged to another layer (a 2:4-pruned int8
    layer was reported more than half dense, now and then)."""
    if not isinstance(tensor, torch.nn.Parameter):
        cache = None
    if cache is not None and id(tensor) in cache:
        return cache[id(tensor)]
    logical = _logical_numel(tensor)
    if logical == tensor.numel():
        count = int(torch.count_nonzero(tensor.detach()))
    elif getattr(tensor, "quant_state", None) is not None:
        from compress.quant.bnb_weights import dequantize_tensor

        count = int(torch.count_nonzero(dequantize_tensor(tensor)))
    else:
        count = logical
    if cache is not None:
        cache[id(tensor)] = count
    return count


def _held_elsewhere(model: Any) -> dict[int, torch.Tensor]:
    """Parameters whose values a layer holds in another form (an int8-dynamic layer keeps its codes only
    in fbgemm's packed copy once it has run): id -> the tensor they stand for, read back once here."""
    return {id(param): tensor for module in model.modules()
            for param, tensor in getattr(module, "read_back", list)()}


def count_parameters(model: Any, _cache: dict[int, int] | None = None,
                     _elsewhere: dict[int, torch.Tensor] | None = None) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting each logical weight once."""
    total = nonzero = 0
    seen: set[int] = set()
    elsewhere = _held_elsewhere(model) if _elsewhere is None else _elsewhere
    for param in model.parameters():
        if id(param) in seen:  # tied weights (e.g. embeddings and lm_head) count once
            continue
        seen.add(id(param))
        tensor = elsewhere.get(id(param), param)
        total += _logical_numel(tensor)
        nonzero += _count_nonzero(tensor, _cache)
    return total, nonzero


def memory_bytes(model: Any, _elsewhere: dict[int, torch.Tensor] | None = None) -> int:
    seen: set[int] = set()
    size = 0
    elsewhere = _held_elsewhere(model) if _elsewhere is None else _elsewhere
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen and not tensor.is_meta:  # meta: offloaded (model.device_map), not in memory
            seen.add(id(tensor))
            held = elsewhere.get(id(tensor), tensor)
            size += held.numel() * held.element_size()
    return size


def _stored_bytes(module: torch.nn.Module) -> int:
    # The module's own state (weight plus any scales, zero points or quantization maps it
    # serialises), so the figure is what the layer really costs, whatever the scheme.
    total = 0
    for value in module.state_dict().values():
        if isinstance(value, torch.Tensor) and not value.is_meta:
            total += value.numel() * value.element_size()
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        total -= bias.numel() * bias.element_size()
    return total


def layer_sizes(model: Any, _cache: dict[int, int] | None = None) -> list[LayerSize]:
    """Sparsity and bits per weight of every weight matrix: linear-like layers and embeddings."""
    return [layer for name, module in model.named_modules()
            if (layer := _layer_size(name, module, _cache)) is not None]


def _layer_size(name: str, module: torch.nn.Module, cache: dict[int, int] | None = None) -> LayerSize | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or list(module.children()):
        return None
    logical = _logical_numel(weight)
    if weight.dim() < 2 and logical == weight.numel():
        return None  # norms and biases are not weight matrices
    return LayerSize(name=name, parameters=logical, nonzero=_count_nonzero(weight, cache),
                     bits_per_weight=round(8 * _stored_bytes(module) / logical, 4))


def measure_size(model: Any, saved_dir: str | Path | None = None, save_fn: Any = None) -> SizeMetrics:
    """Measure a model. Disk bytes come from `saved_dir`, or from saving with `save_fn(tmpdir)`."""
    nonzeros: dict[int, int] = {}  # shared by both counts below
    elsewhere = _held_elsewhere(model)  # unpacks int8-dynamic codes: once per measurement, not per count
    if has_offloaded_weights(model):
        params, nonzero, layers = _count_offloaded(model)
    else:
        params, nonzero = count_parameters(model, nonzeros, elsewhere)
        layers = layer_sizes(model, nonzeros)
    disk = None
    if saved_dir is not None:
        disk = folder_bytes(saved_dir)
    elif save_fn is not None:
        with tempfile.TemporaryDirectory(prefix="compress-size-") as tmp:
            save_fn(Path(tmp))
            disk = folder_bytes(tmp)
    return SizeMetrics(
        parameters=params,
        nonzero_parameters=nonzero,
        sparsity=round(1 - nonzero / params, 6) if params else 0.0,
        memory_bytes=memory_bytes(model, elsewhere),
        disk_bytes=disk,
        bits_per_weight=round(8 * disk / params, 4) if disk and params else None,
        layers=layers,
    )


def _count_offloaded(model: Any) -> tuple[int, int, list[LayerSize]]:
    """count_parameters and layer_sizes for a model with offloaded weights (model.device_map): each
    module's own weights are read in while it is counted, so the whole model is never in memory."""
    from compress.placement import modules_onloaded

    canonical = {name for name, _ in model.named_parameters()}  # tied weights appear once
    total = nonzero = 0
    layers = []
    for prefix, module in modules_onloaded(model):
        for name, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if full in canonical:
                canonical.discard(full)
                total += _logical_numel(param)
                nonzero += _count_nonzero(param)
        if (layer := _layer_size(prefix, module)) is not None:
            layers.append(layer)
    return total, nonzero, layers
