"""QLoRA with `merge: none` never holds a full-precision copy of the base's linear layers: not at load,
baseline evaluation, training, saving (with its reload check) nor the evaluation after the stage.

A watch flags any plain float `nn.Linear` whose weight has the shape of one of the base's linear layers,
on a real device: registered (the parameter-registration hook), run (the forward pre-hook), or returned
by a `from_pretrained` call (transformers fills parameters without registering them). The second test
takes the float-first path on purpose and sees the watch fire, so the first one can fail."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.modules.module import (
    register_module_forward_pre_hook,
    register_module_parameter_registration_hook,
)

from compress import bundle as bundle_module
from compress import loading, run, runner
from compress.stages import finetune

# Two full runs of the tiny Llama (~30-70 s each on 2 shared cores).
pytestmark = pytest.mark.slow


class FloatLinearWatch:
    """Records every full-precision materialisation of a base linear layer while installed."""

    def __init__(self, shapes: set[tuple[int, int]]):
        self.shapes = shapes
        self.seen: list[str] = []

    def check(self, module: Any, where: str) -> None:
        weight = module._parameters.get("weight") if type(module) is torch.nn.Linear else None
        if (weight is not None and weight.device.type != "meta" and weight.is_floating_point()
                and tuple(weight.shape) in self.shapes):
            self.seen.append(f"{where}: float Linear {tuple(weight.shape)} {weight.dtype}")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        handles = [register_module_parameter_registration_hook(lambda m, name, p: self.check(m, "registered")),
                   register_module_forward_pre_hook(lambda m, args: self.check(m, "forward"))]
        real = bundle_module.from_pretrained_checked

        def loaded(task: str, location: str, **kwargs: Any) -> Any:
            model = real(task, location, **kwargs)
            for module in model.modules():
                self.check(module, f"from_pretrained({location})")
            return model

        for module in (loading, finetune):
            monkeypatch.setattr(module, "from_pretrained_checked", loaded)
        monkeypatch.setattr(self, "handles", handles, raising=False)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _base_linear_shapes(model_dir: Any) -> set[tuple[int, int]]:
    """(out, in) of every linear layer of the base but the output head (kept float by design)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    head = model.get_output_embeddings()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head}
    return shapes - {tuple(head.weight.shape)}


def _qlora_run(lm_recipe: dict, tiny_llama_dir: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    lm_recipe["stages"] = [{"type": "finetune", "method": "qlora", "merge": "none", "lr": 1e-2, "max_steps": 2,
                            "batch_size": 8}]
    lm_recipe["eval"]["speed"] = False
    watch = FloatLinearWatch(_base_linear_shapes(tiny_llama_dir))
    watch.install(monkeypatch)
    try:
        report = run(lm_recipe, show_progress=False)
    finally:
        watch.remove()
    return report, watch.seen


def test_qlora_merge_none_never_materialises_a_float_base_linear(lm_recipe, tiny_llama_dir, monkeypatch):
    report, seen = _qlora_run(lm_recipe, tiny_llama_dir, monkeypatch)
    assert seen == []
    info = report.points[-1].stage_info
    assert info["merge"] == "none" and info["quantized_layers"] == 14  # 2 layers x 7 linears, all NF4
    assert any("NF4" in note for note in report.baseline.notes)


def test_the_watch_sees_the_float_first_path(lm_recipe, tiny_llama_dir, monkeypatch):
    """Without the NF4 load plan the base loads in float and the stage reloads it in 4-bit: caught."""
    monkeypatch.setattr(runner, "base_load_plan", lambda stages: None)
    _, seen = _qlora_run(lm_recipe, tiny_llama_dir, monkeypatch)
    assert any(s.startswith("from_pretrained") and "torch.float32" in s for s in seen), seen
