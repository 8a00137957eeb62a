"""The `quantized` model format: a transformers config + safetensors state dict + a layer map.

transformers cannot rebuild compress's own quantized layers from a config, so `load` builds the
float architecture from `config.json`, swaps in empty quantized layers at the names listed in
`compress_quant.json`, and loads the saved tensors strictly: the reload is bit-identical.
bitsandbytes models do not use this format; they are standard transformers checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from compress.bundle import ModelBundle, ModelFormat, auto_class, register_format
from compress.errors import ModelError
from compress.io import write_json_atomic
from compress.quant import dynamic, weight_only  # noqa: F401  (register their layer kinds)
from compress.quant.embedding import QuantEmbedding, TiedQuantHead
from compress.quant.kinds import build_layer, is_own_layer

FORMAT = "quantized"
LAYER_MAP = "compress_quant.json"
WEIGHTS = "model.safetensors"
_SCHEMA = 1


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _save(bundle: ModelBundle, folder: Path) -> None:
    model = bundle.model
    layers = {name: mod.spec() for name, mod in model.named_modules()
              if is_own_layer(mod) or isinstance(mod, TiedQuantHead)}
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    # save_model (not save_file) drops the duplicates of tied tensors, which safetensors refuses.
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(folder / LAYER_MAP, {"schema": _SCHEMA, "layers": layers})


def _load(folder: Path, meta: dict[str, Any]) -> Any:
    from compress.portable import read_config

    layer_map = json.loads((folder / LAYER_MAP).read_text())
    config = read_config(folder)
    model = auto_class(meta["task"]).from_config(config)
    layers = layer_map["layers"]
    for name, spec in layers.items():
        if spec["kind"] != TiedQuantHead.kind:
            try:
                set_module(model, name, build_layer(spec))
            except ModelError as exc:
                raise ModelError(f"{LAYER_MAP}: {name}: {exc}") from None
    # Tied heads last: they read the (now quantized) embedding they name.
    for name, spec in layers.items():
        if spec["kind"] == TiedQuantHead.kind:
            source = model.get_submodule(spec["source"])
            if not isinstance(source, QuantEmbedding):
                raise ModelError(f"{LAYER_MAP}: {name} is tied to {spec['source']}, which is not a quantized "
                                 f"embedding in this file")
            set_module(model, name, TiedQuantHead(source, spec["source"], spec["bias"]))
    missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
    # Tied duplicates are dropped on save and come back through tie_weights.
    tied = {k for k in missing if is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ModelError(f"{folder}: saved tensors do not match the model (missing "
                         f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_tied(model: nn.Module, key: str) -> bool:
    """Whether state-dict entry `key` shares its tensor with another entry (a tied weight)."""
    # A tensor is tied when another state-dict entry shares its storage.
    state = model.state_dict(keep_vars=True)
    target = state.get(key)
    return target is not None and any(v is target for k, v in state.items() if k != key)


register_format(ModelFormat(FORMAT, _save, _load, plain_loadable=False))
