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
        if "owl_m" in spec:
            patch_owl()
            # OWL hands one sparsity to each decoder layer, so the targets are the layers, not the Linears
            # (with ["Linear"] the peer refuses: 30 sparsities for 210 targets).
            return cls(sparsity=spec["sparsity"], mask_structure=spec["mask_structure"], targets=["LlamaDecoderLayer"],
                       ignore=["lm_head"], sparsity_profile="owl", owl_m=spec["owl_m"], owl_lmbda=spec["owl_lmbda"])
        return cls(sparsity=spec["sparsity"], mask_structure=spec["mask_structure"], targets=["Linear"],
                   ignore=["lm_head"])
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = {"num_bits": spec["bits"], "type": "int", "symmetric": spec["symmetric"], "strategy": "group",
               "group_size": spec["group_size"]}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if spec["modifier"] == "awq":
        # 0.14's AWQ only scales (a transform); the quantization modifier after it rounds, with the scheme
        # the scales were searched for. Mappings are its defaults for Llama; duo_scaling its default (on).
        from llmcompressor.modifiers.transform import AWQModifier

        patch_cpu_pinning()
        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if spec["modifier"] == "gptq":
        # compress's GPTQ settings: damping 0.01 of the mean diagonal, blocks of 128 columns; activation
        # order as the row asks (None: the paper's column order; "static": llm-compressor's default, groups
        # fitted up front in the original order, like compress's act_order with static groups).
        return GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=spec.get("actorder"),
                            dampening_frac=0.01, block_size=128)
    return QuantizationModifier(config_groups=groups, ignore=["lm_head"])


def patch_cpu_pinning() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations before each grid search (for faster
    host-to-GPU copies); on a machine without an accelerator torch refuses ("Cannot access accelerator
    device when none is available"). Pinning changes no value, so here it is skipped when there is no
    accelerator to copy to."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def patch_owl() -> None:
    """Two bugs stop llm-compressor 0.14's OWL inside `oneshot`; both are patched here, the OWL arithmetic
    that turns activation norms into layer sparsities stays the peer's own:
    - `_get_activations` collects the norms through the basic calibration pipeline, which fires lifecycle
      events while the modifier is still initializing ("Cannot invoke event before initializing"). The
      patch runs the same forward passes over the same dataloader under the same hooks.
    - `_infer_owl_layer_sparsity` returns a dict by layer name, but the hooks index a list (a dict falls
      through to "one sparsity for all" and the pruning then multiplies by the dict). The patch hands
      the same values over as a list, in the layers' order (the order both are built in)."""
    from collections import defaultdict
    from functools import partial

    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from llmcompressor.utils.helpers import calibration_forward_context

    def get_activations(self: Any, model: Any, dataloader: Any, nsamples: int = 128) -> dict[str, Any]:
        acts: dict[str, Any] = defaultdict(int)

        def save_acts(_module: Any, args: Any, name: str) -> None:  # the peer's hook, verbatim in effect
            x = args[0] if isinstance(args, tuple) else args
            acts[name] += 1.0 / nsamples * x.pow(2).sum(dim=(0, 1)).sqrt()

        hooks = {self.register_hook(mod, partial(save_acts, name=name), "forward_pre")
                 for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.Linear) and "lm_head" not in name}
        with HooksMixin.disable_hooks(keep=hooks), calibration_forward_context(model):
            for batch in dataloader:
                model(**{k: v.to(model.device) for k, v in batch.items()})
        self.remove_hooks(hooks)
        return acts

    infer = SparsityModifierBase._infer_owl_layer_sparsity

    def layer_sparsities(self: Any, model: Any, layers: dict[str, Any], dataloader: Any) -> list[float]:
        by_name = infer(self, model, layers, dataloader)
        return [float(by_name[name]) for name in layers]

    SparsityModifierBase._get_activations = get_activations
    SparsityModifierBase._infer_owl_layer_sparsity = layer_sparsities


def float_weights(model: Any) -> dict[str, Any]:
    """Every decoder-layer linear weight as the model computes with it (fake-quantized where quantized),
    and the layers' norm weights (AWQ folds its input scales into them)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".layers." not in name:
                continue
            if not isinstance(module, torch.nn.Linear):
                if name.endswith("norm") and isinstance(getattr(module, "weight", None), torch.Tensor):
                    out[f"{name}.weight"] = module.weight.detach().float().contiguous().clone()
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
