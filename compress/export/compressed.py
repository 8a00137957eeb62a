"""compressed-tensors export (the format llm-compressor writes; vLLM and transformers load it).

compress's own codes and scales are handed to compressed-tensors' own `ModelCompressor`, which
writes the layout and the `quantization_config` exactly as llm-compressor does:

- int8-dynamic -> W8A8 (int8 symmetric per-channel weights, int8 dynamic per-token activations),
  format `int-quantized`; the weight codes are compress's, bit for bit.
- int4-weight / GPTQ (asymmetric, grouped) -> W4A16 with zero points, format `naive-quantized`
  (one 4-bit code per int8). The packed layout (`pack-quantized`) with zero points is what vLLM
  prefers, but with compressed-tensors 0.20.1 + transformers 5.24 it fails to reload
  (`weight_zero_point` saved packed, (rows/8, groups), the model expects (rows, groups)), so the
  layout that reloads is chosen.
- int8-weight -> W8A16 (symmetric, grouped), format `int-quantized`.
- float models (pruned or not) -> the float weights, zeros kept: compressed-tensors 0.20.1 dropped
  its sparse-bitmask compressors ("legacy"), so a sparse layout cannot be written with it.

The check reloads the folder with plain transformers in a subprocess where `import compress`
fails, and compares its weights with compress's (bit-exact) and its logits with compress's model.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.errors import StageError

# Reloaded logits vs compress's model, relative to the largest logit. Weight-only: same weights,
# float math, so only summation order differs. W8A8: same weights, but compress's fbgemm kernel
# quantizes activations to 7 bits (reduce_range) where compressed-tensors uses 8, so logits move by
# about 1% of the largest logit (tiny Llama: 1.3%); the weights are still checked bit for bit.
WEIGHT_ONLY_TOLERANCE = 1e-5
W8A8_TOLERANCE = 0.05
WEIGHT_TOLERANCE = 1e-6


def _quantized_layers(model: Any) -> dict[str, Any]:
    from compress.quant.dynamic import DynamicInt8Linear
    from compress.quant.weight_only import WeightOnlyLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicInt8Linear | WeightOnlyLinear)}


def layout_problem(bundle: Any) -> str | None:
    """None when compressed-tensors can hold `bundle`'s layers, else what cannot and the fix."""
    if bundle.format not in ("hf", "quantized"):
        return (f"compressed-tensors export takes a float or compress-quantized model, this one is "
                f"{bundle.format!r}; export before that stage")
    from compress.quant.embedding import QuantEmbedding, TiedQuantHead

    for name, module in bundle.model.named_modules():
        if isinstance(module, QuantEmbedding | TiedQuantHead):
            return (f"layer {name} is a quantized embedding, which compressed-tensors does not hold; "
                    f"quantize with embeddings: none")
    for name, module in _quantized_layers(bundle.model).items():
        if getattr(module, "smooth_inv", None) is not None:
            return (f"layer {name} is SmoothQuant-scaled (smooth_alpha), which compressed-tensors cannot express "
                    f"without folding the scales into the previous layer; quantize without smooth_alpha")
    return None


def _scheme_of(module: Any) -> tuple[str, dict[str, Any], str]:
    """(scheme label, compressed-tensors QuantizationScheme fields, compression format) for a layer."""
    if module.kind == "int8-dynamic":
        return ("W8A8", {"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True,
                                     "dynamic": False},
                         "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                                               "symmetric": True, "dynamic": True}}, "int-quantized")
    weights = {"num_bits": module.bits, "type": "int", "strategy": "group", "group_size": module.group,
               "symmetric": module.bits == 8, "dynamic": False}
    if module.bits == 8:
        return (f"W8A16-g{module.group}", {"weights": weights}, "int-quantized")
    return (f"W{module.bits}A16-asym-g{module.group}", {"weights": weights}, "naive-quantized")


def _fill_qparams(target: Any, module: Any) -> None:
    """Copy compress's scales (and zero points) into the layer compressed-tensors prepared."""
    with torch.no_grad():
        target.weight.copy_(module.weight.float())
        target.weight_scale.copy_(module.scales.reshape(target.weight_scale.shape).to(target.weight_scale.dtype))
        if getattr(module, "zeros", None) is not None:
            # compress: w = (q - z) * s with q, z in [0, 15]; compressed-tensors: signed codes in [-8, 7].
            # compress stores unsigned codes with zero points in [0, 2^bits); compressed-tensors holds
            # signed codes, so both shift by half the range (8 at 4 bits, 4 at 3 bits).
            zero = module.zeros.to(torch.int16) - 2 ** (module.bits - 1)
            target.weight_zero_point.copy_(zero.reshape(target.weight_zero_point.shape)
                                           .to(target.weight_zero_point.dtype))


def build_compressed(model: Any) -> tuple[Any, Any, dict[str, list[str]]]:
    """A float copy of `model` carrying compressed-tensors quantization, its ModelCompressor and the
    layer names per scheme. compress's layers become nn.Linear with their exact dequantized weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    from compress.quant.format import set_module

    layers = _quantized_layers(model)
    out = copy.deepcopy(model)
    schemes: dict[str, tuple[dict[str, Any], str, list[str]]] = {}
    for name, module in layers.items():
        label, fields, fmt = _scheme_of(module)
        schemes.setdefault(label, (fields, fmt, []))[2].append(name)
        plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(module.weight.float())
            if module.bias is not None:
                plain.bias.copy_(module.bias.float())
        set_module(out, name, plain)
    if not schemes:
        return out, None, {}
    formats = {fmt for _, fmt, _ in schemes.values()}
    config = QuantizationConfig(
        config_groups={f"group_{i}": {"targets": names, **fields, "format": fmt}
                       for i, (fields, fmt, names) in enumerate(schemes.values())},
        format=formats.pop() if len(formats) == 1 else "mixed-precision", quantization_status="frozen")
    apply_quantization_config(out, config)
    for name, module in layers.items():
        _fill_qparams(out.get_submodule(name), module)
    compressor = ModelCompressor.from_pretrained_model(out)
    return out, compressor, {label: names for label, (_, _, names) in schemes.items()}


# Run in a fresh interpreter: compress is made unimportable first, so the folder must load as a
# user without compress loads it. Writes the logits and the reloaded linear weights.
_RELOAD = """
import sys
sys.modules["compress"] = None
try:
    import compress  # noqa
    raise SystemExit("compress is importable; the reload check would prove nothing")
except ImportError:
    pass
import torch
from safetensors.torch import load_file, save_file
from transformers import {auto}
folder, inputs_path, out_path = sys.argv[1:4]
model = {auto}.from_pretrained(folder).eval()
inputs = load_file(inputs_path)
names = sorted({{k.split("/")[1] for k in inputs}})
logits = {{}}
with torch.no_grad():
    for i in range(len(inputs) // len(names)):
        logits[f"logits/{{i}}"] = model(**{{n: inputs[f"{{i}}/{{n}}"] for n in names}}).logits.float().contiguous()
weights = {{f"weight/{{n}}": m.weight.detach().float().contiguous() for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear)}}
save_file({{**logits, **weights}}, out_path)
"""


def reload_without_compress(folder: Path, task: str, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Logits (one per batch) and linear weights of `folder` as plain transformers loads it."""
    auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}[task]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {f"{i}/{k}": v.contiguous() for i, b in enumerate(batches) for k, v in b.items()}
        save_file(inputs, f"{tmp}/inputs.safetensors")
        done = subprocess.run([sys.executable, "-c", _RELOAD.format(auto=auto), str(folder),
                               f"{tmp}/inputs.safetensors", f"{tmp}/out.safetensors"],
                              check=False, capture_output=True, text=True, cwd=tmp, timeout=1800)
        if done.returncode != 0:
            raise StageError(f"compressed-tensors export: plain transformers could not load {folder}: "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        out = load_file(f"{tmp}/out.safetensors")
    return {"logits": [out[f"logits/{i}"] for i in range(len(batches))],
            "weights": {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("weight/")}}


def export_compressed(bundle: Any, folder: Path, batches: list[dict[str, torch.Tensor]], options: Any,
                      logger: Any) -> dict[str, Any]:
    """Write `bundle` as a compressed-tensors folder, reload it without compress, check, return facts."""
    model = bundle.model
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batches[0]]
    inputs = [{n: b[n] for n in names} for b in batches]
    out, compressor, schemes = build_compressed(model)
    if compressor is not None:
        compressor.compress_model(out)
    out.save_pretrained(folder)
    if compressor is not None:
        compressor.update_config(str(folder))
    bundle.tokenizer.save_pretrained(folder)

    with torch.inference_mode():
        reference = [model(**b).logits.float() for b in inputs]
    got = reload_without_compress(folder, bundle.task, inputs)
    expected_weights = {n: m.weight.detach().float() for n, m in _quantized_layers(model).items()}
    worst_weight, worst_name = 0.0, None
    for name, weight in expected_weights.items():
        reloaded = got["weights"].get(name)
        diff = float("inf") if reloaded is None or reloaded.shape != weight.shape else float(
            (reloaded - weight).abs().max() / (weight.abs().max() or 1.0))
        if diff > worst_weight:
            worst_weight, worst_name = diff, name
    if worst_weight > WEIGHT_TOLERANCE:
        raise StageError(f"compressed-tensors export: layer {worst_name} reloads with different weights "
                         f"({worst_weight:.3g} of its largest weight; allowed {WEIGHT_TOLERANCE:g}): the written "
                         f"codes or scales are not compress's")
    ref, new = torch.cat([r.flatten() for r in reference]), torch.cat([g.flatten() for g in got["logits"]])
    scale = float(ref.abs().max()) or 1.0
    logit_diff = float((ref - new).abs().max()) / scale
    tolerance = options.max_rel_logit_diff
    if tolerance is None:
        tolerance = W8A8_TOLERANCE if "W8A8" in schemes else WEIGHT_ONLY_TOLERANCE
    if not logit_diff <= tolerance:
        raise StageError(f"compressed-tensors export: plain transformers' logits differ from compress's by "
                         f"{logit_diff:.3g} of the largest logit (allowed {tolerance:g}) on {len(reference)} "
                         f"held-out batches")
    top1 = float(torch.cat([(r.argmax(-1) == g.argmax(-1)).flatten() for r, g in
                            zip(reference, got["logits"], strict=True)]).float().mean())
    zeros: dict[str, float] = {}
    for key, mask in bundle.masks.items():
        reloaded = got["weights"].get(key.removesuffix(".weight"))
        if reloaded is None or reloaded.shape != mask.shape:
            continue
        kept_nonzero = int((reloaded[~mask] != 0).sum())
        if kept_nonzero:
            raise StageError(f"compressed-tensors export: layer {key} reloads with {kept_nonzero} nonzero "
                             f"weights where pruning left zeros")
        zeros[key] = round(float((reloaded == 0).float().mean()), 5)
    facts = {
        "format": "compressed-tensors",
        "schemes": ", ".join(f"{label} x{len(n)}" for label, n in schemes.items()) or "float (no quantized layers)",
        "quantization_config": json.loads((folder / "config.json").read_text()).get("quantization_config"),
        "file_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "reload": "plain transformers, in a process where `import compress` fails",
        "max_rel_weight_diff": worst_weight,
        "max_rel_logit_diff": logit_diff,
        "top1_agreement": round(top1, 6),
        "logit_tolerance": tolerance,
        "pruned_zero_fraction": zeros or None,
    }
    logger.info("compressed-tensors export: %s, %.1f MiB; reload without compress: weights %.2g, logits %.2g "
                "of the largest (allowed %g)", facts["schemes"], facts["file_bytes"] / 2**20, worst_weight,
                logit_diff, tolerance)
    return facts


HOW_TO_LOAD = """\
# pip install compressed-tensors transformers
from transformers import {auto}

model = {auto}.from_pretrained("{folder}")
"""
