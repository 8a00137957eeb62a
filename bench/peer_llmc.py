"""The llm-compressor side of bench/bench_peer.py: one `oneshot` in this fresh process, run by the
llm-compressor venv's python (never compress's), timed around the `oneshot` call only.

    /work/venvs/llmc/bin/python -m bench.peer_llmc '<spec json>' <out folder>

The spec names the modifier and its settings, the dense HF folder, the calibration-blocks file and the
thread count. Writes <out>/result.json and, when spec["save"], <out>/weights.safetensors: the decoder
layers' float weights after `oneshot` (quantized layers fake-quantized with their own scales and zero
points), which compress's evaluator loads into the dense model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.peer_io import read_blocks, write_result


def modifier(spec: dict[str, Any]) -> Any:
    """The llm-compressor modifier matching the compress stage (lm_head, embeddings and norms left alone)."""
    if spec["modifier"] in ("wanda", "sparsegpt"):
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        cls = WandaPruningModifier if spec["modifier"] == "wanda" else SparseGPTModifier
        return cls(sparsity=spec["sparsity"], mask_structure=spec["mask_structure"], targets=["Linear"],
                   ignore=["lm_head"])
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = {"num_bits": spec["bits"], "type": "int", "symmetric": spec["symmetric"], "strategy": "group",
               "group_size": spec["group_size"]}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if spec["modifier"] == "gptq":
        # compress's GPTQ settings: damping 0.01 of the mean diagonal, blocks of 128 columns; activation
        # order as the row asks (None: the paper's column order; "static": llm-compressor's default, groups
        # fitted up front in the original order, like compress's act_order with static groups).
        return GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=spec.get("actorder"),
                            dampening_frac=0.01, block_size=128)
    return QuantizationModifier(config_groups=groups, ignore=["lm_head"])


def float_weights(model: Any) -> dict[str, Any]:
    """Every decoder-layer linear weight as the model computes with it (fake-quantized where quantized)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
                continue
            weight = module.weight.detach()
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None:
                zero = getattr(module, "weight_zero_point", None)
                weight = fake_quantize(weight, module.weight_scale, zero, scheme.weights)
            out[f"{name}.weight"] = weight.float().contiguous().clone()
    return out


def check_same_model(model: Any, blocks: list[list[int]], reference: Path, tolerance: float = 1e-3) -> float:
    """The loaded dense model's logits on the first block against compress's (its own transformers):
    a config read differently here (rope, tying, norms) would make the comparison meaningless."""
    import torch
    from safetensors.torch import load_file

    expected = load_file(str(reference))["logits"]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([blocks[0]])).logits[0]
    diff = float((got - expected).abs().max())
    if diff > tolerance:
        raise SystemExit(f"the dense model loads differently here: logits differ from compress's by {diff:.3g} "
                         f"(more than {tolerance}); compare the transformers versions' config handling")
    return diff


def main(spec: dict[str, Any], out: Path) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    blocks, _ = read_blocks(Path(spec["blocks"]))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]})
    recipe = modifier(spec)
    load_seconds = time.perf_counter() - started
    logits_diff = check_same_model(model, blocks, Path(spec["reference"]))
    wall, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(blocks),
            max_seq_length=len(blocks[0]), batch_size=8, shuffle_calibration_samples=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if spec["save"]:
        from safetensors.torch import save_file

        save_file(float_weights(model), str(out / "weights.safetensors"))
    import importlib.metadata as md

    write_result(out / "result.json", {
        "tool": "llmcompressor", "method": spec["label"], "stage_seconds": round(wall, 3),
        "stage_cpu_seconds": round(cpu, 3), "threads": torch.get_num_threads(), "load_seconds": round(load_seconds, 3),
        "torch": torch.__version__, "llmcompressor": md.version("llmcompressor"), "dense_logits_max_diff": logits_diff})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), Path(sys.argv[2]))
