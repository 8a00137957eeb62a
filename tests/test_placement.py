"""model.device_map / model.max_memory: a base model larger than memory is evaluated with its weights
offloaded to disk, with the same numbers as in memory; stages and timing, which cannot work on an
offloaded model, are refused before anything loads."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from compress import run
from compress.errors import RecipeError
from compress.loading import load_base_model
from compress.placement import has_offloaded_weights, placement_problems, plan_device_map
from compress.recipe import load_recipe
from compress.testing import make_tiny_model, tiny_recipe, write_lm_text, write_sentiment_csv

# Below the smallest decoder layer of the tiny models: every block goes to disk.
TIGHT = {"cpu": 20_000}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("placement")
    return {"lm": write_lm_text(root / "lm.txt", n=120), "sentiment": write_sentiment_csv(root / "sentiment.csv", n=120),
            "root": root}


def _recipe(assets: dict[str, Path], model_type: str, out: Path, **model: object) -> dict:
    model_dir = assets["root"] / model_type
    if not model_dir.exists():
        make_tiny_model(model_type, model_dir)
    task = "sequence-classification" if model_type == "bert" else "causal-lm"
    recipe = tiny_recipe(model_dir, assets["sentiment"] if model_type == "bert" else assets["lm"], task, out,
                         eval={"speed": False})
    recipe["model"].update(model)
    return recipe


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])  # tied embeddings, Conv1D, an encoder
def test_an_offloaded_base_evaluates_as_it_does_in_memory(assets: dict[str, Path], tmp_path: Path,
                                                          model_type: str) -> None:
    whole = run(_recipe(assets, model_type, tmp_path / "whole"), show_progress=False).baseline
    placed = run(_recipe(assets, model_type, tmp_path / "placed", device_map="auto", max_memory=TIGHT),
                 show_progress=False).baseline
    note = next(n for n in placed.notes if "model.device_map" in n)
    assert "offloaded (read in at every forward)" in note and "on disk" in note
    for field in ("accuracy", "perplexity", "eval_loss", "examples"):
        assert getattr(placed.accuracy, field) == getattr(whole.accuracy, field), field
    # Counted one module at a time from the offload store: the same parameters and non-zeros.
    assert (placed.size.parameters, placed.size.nonzero_parameters) == (whole.size.parameters,
                                                                         whole.size.nonzero_parameters)
    assert [(x.name, x.nonzero) for x in placed.size.layers] == [(x.name, x.nonzero) for x in whole.size.layers]
    # Only what stayed in memory counts as memory.
    assert placed.size.memory_bytes < whole.size.memory_bytes / 2


def test_the_weights_really_are_offloaded_and_the_folder_goes_with_the_model(assets: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(assets, "llama", tmp_path / "r", device_map={"model.embed_tokens": "cpu",
                                                                             "model.layers.0": "cpu",
                                                                             "model.layers.1": "disk",
                                                                             "model.norm": "cpu",
                                                                             "model.rotary_emb": "cpu",
                                                                             "lm_head": "cpu"}))
    whole = load_base_model(load_recipe(_recipe(assets, "llama", tmp_path / "w")).model, "causal-lm", None,
                            "cpu", 0)
    bundle = load_base_model(recipe.model, "causal-lm", None, "cpu", 0)
    model = bundle.model
    assert model.hf_device_map["model.layers.1"] == "disk" and has_offloaded_weights(model)
    assert all(p.is_meta for p in model.model.layers[1].parameters())
    assert not any(p.is_meta for p in model.model.layers[0].parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, whole.model(ids).logits)
    folder = Path(model._compress_offload.name)
    assert folder.is_dir() and folder.name.startswith("compress-offload-")
    del bundle, model
    gc.collect()
    assert not folder.exists()  # compress created it, and removes it with the model


def test_stages_and_timing_on_an_offloaded_base_are_refused_before_loading(assets: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    recipe = _recipe(assets, "llama", tmp_path / "out", device_map="auto", max_memory=TIGHT)
    recipe["stages"] = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    recipe["eval"]["speed"] = True
    with pytest.raises(RecipeError) as err:
        run(recipe, show_progress=False)
    text = str(err.value)
    assert "stages[0] (prune): model.device_map offloads" in text and "raise model.max_memory" in text
    assert "eval.speed: model.device_map offloads" in text and "set eval.speed: false" in text
    assert err.value.exit_code == 2
    assert not (tmp_path / "out").exists()  # refused before the run folder was made


def test_a_map_that_keeps_everything_on_the_run_device_runs_stages(assets: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(assets, "llama", tmp_path / "out", device_map={"": "cpu"})
    recipe["stages"] = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    report = run(recipe, show_progress=False)
    assert report.status == "complete" and report.final.size.sparsity > 0.3


def test_plan_is_made_from_the_config_and_names_what_it_offloads(assets: dict[str, Path], tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(assets, "llama", tmp_path / "r", device_map="auto", max_memory=TIGHT))
    placed = plan_device_map(recipe.model, "causal-lm", "cpu")
    assert "disk" in placed.values()
    roomy = load_recipe(_recipe(assets, "llama", tmp_path / "r", device_map="auto"))
    assert set(plan_device_map(roomy.model, "causal-lm", "cpu").values()) == {"cpu"}
    assert placement_problems(roomy.model, {"": "cpu"}, "cpu", recipe.stages, True, 1) == []
    # The CPU is offload on a GPU run (accelerate copies those weights in at every forward).
    gpu = placement_problems(recipe.model, {"model": 0, "lm_head": "cpu"}, "cuda", [], False, 1)
    assert gpu == []  # nothing asked of it but evaluation
    two = placement_problems(recipe.model, {"model": 0, "lm_head": "cpu"}, "cuda", [], False, 2)
    assert "device_map is for one process" in two[0]


@pytest.mark.parametrize(("model", "message"), [
    ({"max_memory": {"cpu": "1GiB"}}, "max_memory: it only limits model.device_map"),
    ({"device_map": {"lm_head": "gpu0"}}, "devices must be cpu, disk"),
    ({"device_map": {}}, "an empty mapping places nothing"),
])
def test_placement_fields_are_checked(assets: dict[str, Path], tmp_path: Path, model: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(assets, "llama", tmp_path / "r", **model))


def test_a_gguf_base_is_not_offloaded_to_disk(assets: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    recipe = load_recipe(_recipe(assets, "llama", tmp_path / "r", device_map="auto"))
    spec = recipe.model.model_copy(update={"path": str(tmp_path / "m.gguf")})
    problems = placement_problems(spec, {"model": "cpu", "lm_head": "disk"}, "cpu", [], False, 1)
    assert problems and "a GGUF checkpoint cannot be offloaded to disk" in problems[0]
    assert placement_problems(spec, {"": "cpu"}, "cpu", [], False, 1) == []


def test_plan_counts_only_the_weights_the_map_keeps(assets: dict[str, Path], tmp_path: Path) -> None:
    from compress.plan.planner import plan_recipe

    whole = plan_recipe(load_recipe(_recipe(assets, "llama", tmp_path / "r")), check_devices=False)
    # Room for the embeddings, not for a decoder layer: those go to disk.
    recipe = _recipe(assets, "llama", tmp_path / "r", device_map="auto", max_memory={"cpu": 200_000})
    recipe["stages"] = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    placed = plan_recipe(load_recipe(recipe), check_devices=False)
    (row,) = placed.stages  # the stage is not planned: the run refuses it
    everything = whole.stages[0].parts["weights"]
    assert 0 < row.parts["weights held"] < everything / 2
    assert 0 < row.parts["largest offloaded, read in"] < everything
    assert any("stages are refused" in note for note in row.notes)


def test_a_named_map_must_name_real_modules_and_place_every_weight(assets: dict[str, Path], tmp_path: Path) -> None:
    typo = _recipe(assets, "llama", tmp_path / "a", device_map={"model.layer.1": "disk", "": "cpu"})
    with pytest.raises(RecipeError, match=r"no module named 'model.layer.1' in this model \(its top-level modules: "
                                          r"model, lm_head\)"):
        run(typo, show_progress=False)
    partial = _recipe(assets, "llama", tmp_path / "b", device_map={"model": "cpu"})
    with pytest.raises(RecipeError, match=r"nothing places lm_head.weight \(1 tensors\)"):
        run(partial, show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
