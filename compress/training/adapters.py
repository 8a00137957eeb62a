"""Adapter plumbing around peft: target detection, 4-bit bases, masked adapters, merge policies, sparsity.

peft does the adapters; this module adds what it does not: keeping a pruned base sparse through
training and merging (masked LoRA), and merging into a bitsandbytes base while keeping it quantized
(dequantize -> merge -> requantize), each followed by a check that the property really held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compress.layers import CLASSIFIER_HEADS
from compress.quant.bnb_weights import dequantize_weight, keep_canonical_layout

# Classifier heads peft's SEQ_CLS task trains in full; never adapter targets (the one head list).
HEAD_NAMES = CLASSIFIER_HEADS


def _bnb_classes() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_bnb(module: Any) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def _adaptable_types() -> tuple[type, ...]:
    # GPT-2's projections are transformers' Conv1D (a linear layer stored transposed); peft's LoRA
    # adapts it (fan_in_fan_out), so it is a target like any Linear.
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def _in_head(part: str) -> bool:
    # peft matches modules_to_save by name *suffix*, so DistilBERT's `pre_classifier` is trained in
    # full with the `classifier` head; giving it a LoRA adapter as well made peft refuse to wrap it.
    return part.endswith(HEAD_NAMES) or part.startswith("lora_")


def linear_layers(model: Any) -> dict[str, Any]:
    """Every linear layer (plain, Conv1D or bitsandbytes) by full module name, output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    types = _adaptable_types()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and module is not head and not any(map(_in_head, name.split("."))):
            out[name] = module
    return out


def keep_float(model: Any) -> list[str]:
    """Modules a 4-bit load must leave in float: the heads (trained in full, or tied to embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if head is not None and m is head]
    return list(HEAD_NAMES) + [n.rsplit(".", 1)[-1] for n in names]


def default_targets(model: Any) -> list[str]:
    """Short names of every linear layer except the heads: q/k/v/o, MLP, pooler — per architecture,
    read from the model rather than from a table that goes stale."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)})


def check_targets(model: Any, targets: list[str]) -> list[str]:
    """Targets matching no module, each with the candidates."""
    names = [n for n, _ in model.named_modules()]
    candidates = ", ".join(default_targets(model))
    return [f"target_modules: {t!r} matches no module of this model; candidates: {candidates}"
            for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def bnb_4bit_problem(device: str) -> str | None:
    """Why bitsandbytes 4-bit cannot run here, or None when it can (tried on a tiny layer)."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to(device) if device != "cpu" else layer
        if device == "cpu":
            layer.weight = layer.weight._quantize("cpu")
        layer(torch.randn(2, 64, device=device))
    except Exception as exc:  # ImportError, missing native library, unsupported device
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def nf4_config(*, compute_dtype: str, double_quant: bool, skip: list[str]) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA's NF4 base, leaving `skip` modules in float."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype), llm_int8_skip_modules=skip)


def load_4bit(model: Any, task: str, folder: Path, *, compute_dtype: str, double_quant: bool,
              skip: list[str]) -> Any:
    """Reload `model` with its linear layers in bitsandbytes NF4 via transformers' own loader, so the
    result carries a `quantization_config` and saves/reloads as a normal Hugging Face folder.
    (Used when the float model is already in memory; a QLoRA base read from its checkpoint loads
    straight into 4-bit instead: compress.loading.)"""
    # Written with huggingface_hub rather than save_pretrained, which writes on distributed rank 0
    # only: every process of a distributed QLoRA reloads its own copy (the caller gives each its folder).
    from huggingface_hub import save_torch_state_dict

    from compress.bundle import auto_class
    from compress.quant.bnb import linear_subclasses_as_linear

    model.config.save_pretrained(folder)
    save_torch_state_dict({k: v.detach() for k, v in model.state_dict().items()}, folder)
    config = nf4_config(compute_dtype=compute_dtype, double_quant=double_quant, skip=skip)
    device = next(model.parameters()).device
    # Falcon's FalconLinear (an nn.Linear subclass) is left float by transformers' own loader; the
    # context makes it quantize such layers too (a saved 4-bit base then loads in compress's hf-bnb
    # format: compress.quant.bnb.output_format tells which).
    with linear_subclasses_as_linear():
        quantized = auto_class(task).from_pretrained(str(folder), quantization_config=config,
                                                     device_map={"": str(device) if device.type != "cpu" else "cpu"})
    keep_canonical_layout(quantized)  # same numbers on every CPU (see quant/bnb_weights)
    return quantized


def count_bnb(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        if is_bnb(module):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


# ------------------------------------------------------------------------------- masked adapters

# Additive peft methods whose update compress can mask (peft type -> the layer's input-dropout dict,
# if it has one). IA³ is absent: it scales weights, so pruned zeros stay zero without a mask.
MASKABLE = {"LORA": "lora_dropout", "LOHA": None, "LOKR": None, "VERA": "vera_dropout"}


def tuner_layers(peft_model: Any) -> dict[str, Any]:
    """peft's adapter layers (any method) keyed by the base model's module name (the name masks use)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = peft_model.get_base_model()
    return {name: m for name, m in root.named_modules() if isinstance(m, BaseTunerLayer)}


def peft_type(peft_model: Any) -> str | None:
    """The active adapter's peft method (`LORA`, `IA3`, `PROMPT_TUNING`, ...), None for a plain model."""
    configs = getattr(peft_model, "peft_config", None)
    if not configs:
        return None
    config = configs[getattr(peft_model, "active_adapter", None) or next(iter(configs))]
    return str(getattr(config.peft_type, "value", config.peft_type))


def enable_masked(peft_model: Any, masks: dict[str, torch.Tensor]) -> int:
    """Make each adapted layer whose weight is pruned compute `base(x) + x @ (mask * delta)^T`, with
    `delta` peft's own `get_delta_weight` (LoRA, LoHa, LoKr, VeRA), so the learned update is zero
    wherever the base is pruned and the merge keeps the sparsity exactly. peft has no masked
    adapters; the override is an instance-level forward on those layers only. Returns the count."""
    kind = peft_type(peft_model)
    if kind not in MASKABLE:
        return 0
    count = 0
    for name, layer in tuner_layers(peft_model).items():
        mask = masks.get(f"{name}.weight")
        if mask is None:
            continue
        layer.register_buffer("compress_mask", mask.to(layer.get_base_layer().weight.device), persistent=False)
        layer.forward = _masked_forward(layer, MASKABLE[kind])
        count += 1
    return count


# The name the LoRA-only version had (kept for callers outside this module).
enable_masked_lora = enable_masked


def _masked_forward(layer: Any, dropout_attr: str | None):
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        if layer.disable_adapters or layer.merged:
            return result
        for name in layer.active_adapters:
            if name not in getattr(layer, layer.adapter_layer_names[0]):  # not adapted in this layer
                continue
            delta = layer.get_delta_weight(name)  # in the base weight's layout, scaling included
            delta = delta * layer.compress_mask.to(delta.dtype)
            if getattr(layer, "fan_in_fan_out", False):  # Conv1D stores (in, out)
                delta = delta.T
            dropout = getattr(layer, dropout_attr)[name] if dropout_attr else None
            x_in = (dropout(x) if dropout is not None else x).to(delta.dtype)
            result = result + F.linear(x_in, delta).to(result.dtype)
        return result

    return forward


def sparsity(model: Any, masks: dict[str, torch.Tensor]) -> float | None:
    """Share of the pruned positions (mask False) that are exactly zero, over every masked weight;
    bitsandbytes weights are dequantized first. None when nothing is masked."""
    if not masks:
        return None
    # An adapter kept unmerged (merge: none): the base's weights are those a plain load would give.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(root.named_modules())
    zeros = pruned = 0
    for key, mask in masks.items():
        module = modules.get(key.rsplit(".", 1)[0])
        if module is None:
            continue
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        weight = dequantize_weight(module) if is_bnb(module) else module.weight
        pruned_here = ~mask.to(weight.device)
        pruned += int(pruned_here.sum())
        zeros += int((weight.detach()[pruned_here] == 0).sum())
    return zeros / pruned if pruned else None


# ------------------------------------------------------------------------------- merging


def _requantize(base: Any, weight: torch.Tensor) -> None:
    """Put `weight` back into the bitsandbytes layer `base` with its original quantisation settings."""
    import bitsandbytes as bnb

    device = base.weight.device
    if isinstance(base, bnb.nn.Linear4bit):
        old = base.weight
        new = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type=old.quant_type,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_storage=old.quant_storage)
        base.weight = new._quantize("cpu") if device.type == "cpu" else new.to(device)
    else:
        new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
        base.weight = new.to(device)
        # The layer caches the int8 matrix and scales of the old weight; make it read the new ones.
        base.state.CB, base.state.SCB = None, None


def merge_lora(peft_model: Any, masks: dict[str, torch.Tensor], requantize: bool) -> Any:
    """Merge every LoRA adapter into its base layer and unload peft.

    Quantized base layers are dequantized, merged and, with `requantize`, quantized again with the
    same settings; otherwise they become plain float `nn.Linear` layers. Masked layers add
    `mask * delta` so pruned weights stay exactly zero.
    """
    for name, layer in tuner_layers(peft_model).items():
        base = layer.get_base_layer()
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        if isinstance(delta, int):
            continue
        mask = masks.get(f"{name}.weight")
        if mask is not None:
            delta = delta * mask.to(delta.device, delta.dtype)
        with torch.no_grad():
            if is_bnb(base):
                dtype = getattr(base, "compute_dtype", None) or torch.float32
                weight = dequantize_weight(base).float() + delta.float()
                if requantize:
                    _requantize(base, weight)
                else:
                    plain = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                            device=weight.device, dtype=dtype)
                    plain.weight.copy_(weight.to(dtype))
                    if base.bias is not None:
                        plain.bias.copy_(base.bias.detach().to(dtype))
                    layer.base_layer = plain
            else:
                base.weight.add_(delta.to(base.weight.dtype))
    model = peft_model.unload()
    # `merge` promises a float model: layers that were quantized but not adapted are dequantized too.
    return model if requantize else dequantize_all(model)


def dequantize_all(model: Any) -> Any:
    """Replace every bitsandbytes layer by a float nn.Linear holding its dequantized weight."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_bnb(child):
                dtype = getattr(child, "compute_dtype", None) or torch.float32
                weight = dequantize_weight(child)
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                        device=weight.device, dtype=dtype)
                with torch.no_grad():
                    plain.weight.copy_(weight.to(dtype))
                    if child.bias is not None:
                        plain.bias.copy_(child.bias.detach().to(dtype))
                setattr(parent, child_name, plain)
    drop_quantization(model)
    return model


def drop_quantization(model: Any) -> None:
    """Forget that the model was loaded quantized, so it saves and reloads as a float model."""
    if count_bnb(model):
        return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except AttributeError:
                pass
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass


def merge_with_peft(peft_model: Any, masks: dict[str, torch.Tensor]) -> Any:
    """Merge any mergeable peft method (IA³, LoHa, LoKr, VeRA, ...) into a float base with peft's own
    `merge_and_unload`. Layers trained masked (enable_masked) then keep only `mask * delta`: the base
    is zero where the mask is, so masking the merged weight is exactly that."""
    masked = [name for name, layer in tuner_layers(peft_model).items() if hasattr(layer, "compress_mask")]
    model = peft_model.merge_and_unload()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in masked:
            weight = modules[name].weight
            weight.mul_(masks[f"{name}.weight"].to(weight.device, weight.dtype))
    return model


# ------------------------------------------------------------------------------- adapter saving


def base_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The base model's own weights under their original names, without any adapter: each peft
    layer contributes its wrapped base layer (peft's `get_base_layer`), each modules-to-save wrapper
    its original module. Walked by structure, so it holds for every peft method."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    out: dict[str, torch.Tensor] = {}

    def walk(module: Any, prefix: str) -> None:
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module = module.original_module
        state = module.state_dict()  # the module's own serialisation (bitsandbytes adds its quant state)
        if not any(isinstance(m, wrappers) for m in module.modules()):
            out.update({prefix + k: v for k, v in state.items()})
            return
        out.update({prefix + k: v for k, v in state.items() if "." not in k})  # direct parameters/buffers
        for name, child in module.named_children():
            walk(child, f"{prefix}{name}.")

    walk(peft_model.get_base_model(), "")
    return out
