"""`model.dtype: auto`: the checkpoint's own dtype, bf16 on a GPU that has it when the checkpoint names none."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.loading import checkpoint_dtype, load_base_model, load_config, resolve_dtype
from compress.plan import plan_recipe
from compress.recipe import ModelSpec, load_recipe


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).exists():
            (folder / name).write_bytes((tiny_llama_dir / name).read_bytes())
    return folder


@pytest.fixture
def undated_llama(tmp_path, tiny_llama_dir):
    """The tiny Llama with no dtype in its config.json."""
    folder = tmp_path / "undated"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_auto_is_the_checkpoint_dtype(bf16_llama):
    spec = ModelSpec(path=str(bf16_llama), dtype="auto")
    assert checkpoint_dtype(load_config(spec)) == "bfloat16"
    assert resolve_dtype(spec, load_config(spec), "cpu") == "bfloat16"
    bundle = load_base_model(spec, "causal-lm", None, "cpu", 0)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}


def test_explicit_dtype_wins_over_the_checkpoint(bf16_llama):
    spec = ModelSpec(path=str(bf16_llama), dtype="float32")
    assert resolve_dtype(spec, load_config(spec), "cpu") == "float32"
    bundle = load_base_model(spec, "causal-lm", None, "cpu", 0)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}


def test_no_checkpoint_dtype_means_bf16_only_on_a_gpu_that_has_it(undated_llama):
    spec = ModelSpec(path=str(undated_llama), dtype="auto")
    config = load_config(spec)
    assert checkpoint_dtype(config) is None
    assert resolve_dtype(spec, config, "cpu") == "float32"
    assert resolve_dtype(spec, config, "cuda", bf16_supported=True) == "bfloat16"
    assert resolve_dtype(spec, config, "cuda", bf16_supported=False) == "float32"
    bundle = load_base_model(spec, "causal-lm", None, "cpu", 0)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}


def test_plan_and_preflight_use_the_resolved_dtype(lm_recipe, bf16_llama):
    from compress.preflight import check_before_loading

    lm_recipe["model"].update(path=str(bf16_llama), dtype="auto")
    recipe = load_recipe(lm_recipe)
    plan = plan_recipe(recipe, device="cpu", check_devices=False)
    assert plan.dtype == "bfloat16"
    assert plan.stages[0].parts["weights"] == plan.params * 2
    check_before_loading(recipe, "causal-lm", None, "cpu")  # no KeyError on "auto"; the tiny model fits
    shipped = load_recipe("recipes/plan/llama-2-7b-qlora.yaml", ["model.dtype=auto"])
    assert plan_recipe(shipped, device="cuda", check_devices=False).dtype == "float16"  # Llama-2's config


def test_auto_is_a_valid_recipe_value_and_typos_are_named(lm_recipe):
    from compress.errors import RecipeError

    lm_recipe["model"]["dtype"] = "auto"
    assert load_recipe(lm_recipe).model.dtype == "auto"
    lm_recipe["model"]["dtype"] = "bf16"
    with pytest.raises(RecipeError, match="model.dtype"):
        load_recipe(lm_recipe)
