"""Mid-stage training checkpoints: weights, optimizer, scheduler, RNG and loop position — no pickle.

Tensors go to safetensors; everything else (the optimizer's nesting, scheduler state, RNG states,
curves) goes to JSON. torch's own `optimizer.state_dict()` is a nested dict of tensors and numbers,
so it is flattened into `path -> tensor` for safetensors and the structure kept in JSON, where each
tensor leaf is replaced by a reference to its key. That also covers bitsandbytes' 8-bit optimizers,
whose state nests a quantisation-state dict.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from compress.io import atomic_dir

_TENSOR = "__tensor__"
WEIGHTS = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
STATE = "state.json"


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of `obj`, with every tensor moved into `tensors` under a unique key."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        # JSON keys are strings; remember int keys (optimizer state is keyed by parameter index).
        return {"__dict__": [[k, flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, f"{prefix}[{i}]", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} without pickle")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain JSON data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(folder: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves the previous one intact."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(optimizer_state, "opt", tensors)
    with atomic_dir(folder) as tmp:
        # clone(): tied parameters share storage, which safetensors refuses.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(tmp / WEIGHTS))
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / STATE).write_text(json.dumps({**state, "optimizer": structure}))


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
    """(weights, optimizer state, loop state), or None when `folder` holds no complete checkpoint."""
    if not (folder / STATE).exists():
        return None
    state = json.loads((folder / STATE).read_text())
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    optimizer_state = unflatten(state.pop("optimizer"), tensors)
    return load_file(str(folder / WEIGHTS)), optimizer_state, state
