"""Unstructured and N:M pruning: masks, Wanda's scoring, masks surviving fine-tuning, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress.stages  # noqa: F401  (registers the stages)
from compress import load_recipe, run
from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.data import load_data
from compress.errors import RecipeError, StageError
from compress.pruning.masks import check_nm, nm_mask, unstructured_mask, wanda_score
from compress.recipe import DataSpec
from compress.stages.prune import Prune, check_prune, run_prune


def _ctx(tmp_path, data=None) -> RunContext:
    return RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, show_progress=False)


@pytest.fixture
def lm_data(lm_text):
    return load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2, calibration_samples=16),
                     "causal-lm")


def test_unstructured_mask_exact_share_and_row_balance():
    score = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    layer = unstructured_mask(score, 0.25, per_row=False)
    assert int((~layer).sum()) == 32  # 25% of 128
    rows = unstructured_mask(score, 0.5, per_row=True)
    assert ((~rows).sum(1) == 8).all()  # every output row loses exactly half its inputs


def test_nm_mask_every_group_of_four_keeps_two_largest():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(score, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


def test_wanda_keeps_small_weights_on_loud_inputs():
    # Column 0 has small weights but 100x larger activations: Wanda keeps it, magnitude drops it.
    weight = torch.tensor([[0.1, 0.5, 0.6, 0.7]])
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0])
    assert unstructured_mask(weight.abs(), 0.25, per_row=True).tolist() == [[False, True, True, True]]
    wanda = unstructured_mask(wanda_score(weight, norms), 0.25, per_row=True)
    assert wanda.tolist() == [[True, False, True, True]]


def test_two_four_output_is_exact_and_masks_are_kept(tiny_llama_dir, tmp_path, lm_data):
    bundle = ModelBundle.load(tiny_llama_dir)
    out = run_prune(bundle, Prune(structure="n:m", pattern="2:4", method="wanda"), _ctx(tmp_path, lm_data))
    linears = {n: m for n, m in out.bundle.model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == 14 and set(out.bundle.masks) == {f"{n}.weight" for n in linears}
    for name, lin in linears.items():
        w = lin.weight.reshape(lin.out_features, -1, 4)
        assert ((w == 0).sum(-1) >= 2).all(), name  # every group of 4 holds at least 2 zeros
        assert check_nm(lin.weight, 2, 4)
        assert torch.equal(out.bundle.masks[f"{name}.weight"], lin.weight != 0)
    assert out.bundle.model.lm_head.weight.count_nonzero() == out.bundle.model.lm_head.weight.numel()  # skipped by default
    info = out.facts
    assert info["measured_sparsity_pruned_layers"] == 0.5 and "sparse tensor cores" in info["speed_note"]
    assert out.bundle.lineage[-1]["stage"] == "prune" and out.bundle.lineage[-1]["pattern"] == "2:4"


def test_per_layer_sparsity_and_targets(tiny_bert_dir, tmp_path):
    bundle = ModelBundle.load(tiny_bert_dir)
    config = Prune(sparsity=0.5, targets=[r"encoder\.layer\.\d+\..*"], layer_sparsity={r"layer\.1\..*": 0.25})
    out = run_prune(bundle, config, _ctx(tmp_path))
    per_layer = out.facts["per_layer_sparsity"]
    assert per_layer["bert.encoder.layer.0.intermediate.dense"] == 0.5
    assert per_layer["bert.encoder.layer.1.intermediate.dense"] == 0.25
    assert "bert.pooler.dense" not in per_layer and "classifier" not in per_layer


def test_masks_survive_full_finetune_and_report_shows_sparsity(cls_recipe):
    cls_recipe["stages"] = [{"type": "prune", "sparsity": 0.6},
                            {"type": "finetune", "method": "full", "lr": 1e-3, "max_steps": 3,
                             "batch_size": 8}]
    cls_recipe["eval"]["speed"] = False
    report = run(cls_recipe, show_progress=False)
    pruned, tuned = report.points[1], report.points[2]
    # Training fills the zero-initialised biases but no pruned weight: ~60% of the linears stay zero.
    assert pruned.size.sparsity > 0.5 and tuned.size.sparsity > 0.49
    assert any("no speed-up" in n or "speed nothing up" in n for n in tuned.notes)
    final = ModelBundle.load(cls_recipe["output_dir"] + "/02-finetune")
    params = dict(final.model.named_parameters())
    assert len(final.masks) == 13  # 12 encoder linears and the pooler; the classifier is skipped
    for name, mask in final.masks.items():
        assert params[name][~mask].abs().max() == 0 and mask.float().mean() == pytest.approx(0.4, abs=0.01)
        assert params[name][mask].count_nonzero() == mask.sum()  # the kept weights were trained
    md = open(cls_recipe["output_dir"] + "/report.md").read()
    assert "sparsity" in md and "no speed-up" in md


def test_bad_sparsity_is_a_recipe_error(cls_recipe):
    cls_recipe["stages"] = [{"type": "prune", "sparsity": 1.0}]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.sparsity: must be < 1 \(got 1.0\)"):
        load_recipe(cls_recipe)
    cls_recipe["stages"] = [{"type": "prune", "structure": "n:m", "pattern": "4:2"}]
    with pytest.raises(RecipeError, match="pattern: '4:2' is not N:M with 0 < N < M"):
        load_recipe(cls_recipe)


def test_nm_not_dividing_input_fails_before_any_work(cls_recipe, tmp_path):
    cls_recipe["stages"] = [{"type": "prune", "structure": "n:m", "pattern": "3:5"}]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.pattern: M=5 does not divide the input dimension of "
                                          r"bert\.encoder\.layer\.0\.attention\.self\.query \(in 64\)"):
        run(cls_recipe, show_progress=False)
    assert not (tmp_path / "run" / "00-baseline").exists()


def test_wanda_without_calibration_data(tiny_llama_dir, tmp_path):
    bundle = ModelBundle.load(tiny_llama_dir)
    config = Prune(sparsity=0.5, method="wanda")
    assert check_prune(bundle, config, _ctx(tmp_path)) == [
        "method: wanda needs calibration data (activations on real inputs) but the recipe has no data "
        "section; add one or use method: magnitude"]
    with pytest.raises(StageError, match="prune.method: wanda needs calibration data"):
        run_prune(bundle, config, _ctx(tmp_path))


def test_targets_matching_nothing_name_the_layers_including_conv1d(tmp_path):
    """GPT-2's projections are Conv1D and Falcon's FalconLinear: both are listed and prunable."""
    from compress.testing import make_tiny_model

    for arch, expected in (("gpt2", "c_attn, c_fc, c_proj"), ("falcon", "dense, dense_4h_to_h")):
        bundle = ModelBundle.load(make_tiny_model(arch, tmp_path / arch))
        assert check_prune(bundle, Prune(sparsity=0.5), _ctx(tmp_path)) == []
        problems = check_prune(bundle, Prune(sparsity=0.5, targets=["nothing"]), _ctx(tmp_path))
        assert len(problems) == 1 and problems[0].startswith("targets: 'nothing' matches no layer"), problems
        assert expected in problems[0], problems
        # A pattern that matches a head only: the head is left out by default, so nothing is left.
        problems = check_prune(bundle, Prune(sparsity=0.5, ignore=[".*"]), _ctx(tmp_path))
        assert len(problems) == 1 and "no linear layer is left after leaving out ['.*']" in problems[0]


def test_one_selector_anchors_patterns_to_whole_name_parts(tiny_llama_dir):
    from compress.layers import matches
    from compress.pruning.targets import select_linears

    assert matches("model.layers.1.self_attn.q_proj", "q_proj")
    assert not matches("model.layers.10.self_attn.q_proj", r"layers\.1\..*")  # an unanchored search hits it
    assert matches("model.layers.1.self_attn.q_proj", r"layers\.1\..*")
    assert not matches("model.layers.1.self_attn.q_proj", "proj")
    model = ModelBundle.load(tiny_llama_dir).model
    assert "lm_head" not in select_linears(model, None, None)  # heads are left alone by default
    assert "lm_head" in select_linears(model, ["lm_head"], None)  # unless targets names them
    picked = select_linears(model, [r"mlp\..*"], ["down_proj"])
    assert sorted(n.split(".", 3)[-1] for n in picked) == ["mlp.gate_proj"] * 2 + ["mlp.up_proj"] * 2
    # `exclude` is still accepted, as the old name of `ignore`.
    assert Prune(sparsity=0.5, exclude=["q_proj"]).ignore == ["q_proj"]


def test_conv1d_masks_are_kept_in_the_parameters_layout(tmp_path, lm_data):
    """Conv1D stores (in, out): N:M groups must run along the inputs, i.e. down its columns."""
    from compress.pruning.targets import oriented
    from compress.testing import make_tiny_model

    bundle = ModelBundle.load(make_tiny_model("gpt2", tmp_path / "gpt2"))
    out = run_prune(bundle, Prune(structure="n:m", method="wanda"), _ctx(tmp_path, lm_data))
    layer = out.bundle.model.transformer.h[0].mlp.c_proj  # Conv1D(128 -> 64): weight (128, 64)
    assert out.bundle.masks["transformer.h.0.mlp.c_proj.weight"].shape == layer.weight.shape == (128, 64)
    assert check_nm(oriented(layer), 2, 4) and not check_nm(layer.weight, 2, 4)


# ------------------------------------------------------------------------------ OWL


def test_owl_allocation_falls_with_outliers_and_keeps_the_mean():
    from compress.pruning.owl import block_of, block_sparsities

    assert block_of("model.layers.12.mlp.up_proj") == "model.layers.12" and block_of("lm_head") is None
    ratios = {"b.0": 0.01, "b.1": 0.03, "b.2": 0.02, "b.3": 0.01}
    sparsity = block_sparsities(ratios, 0.7, 0.08)
    assert sum(sparsity.values()) / 4 == pytest.approx(0.7, abs=1e-6)
    assert sparsity["b.1"] == pytest.approx(0.7 - 0.08 - (0.7 - 0.7), abs=0.1)
    assert sparsity["b.1"] < sparsity["b.2"] < sparsity["b.0"] == sparsity["b.3"]  # more outliers, less pruned
    assert max(sparsity.values()) - min(sparsity.values()) == pytest.approx(0.16, abs=1e-6)  # 2 x spread
    assert set(block_sparsities({"b.0": 0.02, "b.1": 0.02}, 0.5, 0.08).values()) == {0.5}


def test_owl_allocation_follows_the_reference_code_and_refuses_blocks_outside_0_1():
    from compress.pruning.owl import block_sparsities

    # luuyin/OWL prune_wanda_outlier: density = minmax(ratio) * 2λ - mean + (1 - S); sparsity = 1 - density.
    # The span is centred on the mean, not on S: b.1 sits 0.10 below the target, more than λ = 0.08.
    sparsity = block_sparsities({"b.0": 0.01, "b.1": 0.03, "b.2": 0.02, "b.3": 0.01}, 0.7, 0.08)
    assert sparsity == pytest.approx({"b.0": 0.76, "b.1": 0.60, "b.2": 0.68, "b.3": 0.76}, abs=1e-6)
    # 0.29 <= 0.7 < 1 - 0.29 passes the recipe check, but the one quiet block lands at 0.7 + 0.435
    with pytest.raises(StageError, match=r"owl_spread: 0\.29 around sparsity 0\.7 gives block sparsities "
                                         r"outside \[0, 1\) for \{'b\.3': 1\.135\}.*lower owl_spread"):
        block_sparsities({"b.0": 0.03, "b.1": 0.03, "b.2": 0.03, "b.3": 0.01}, 0.7, 0.29)


def _owl_prune(tiny_llama_dir, tmp_path, lm_data, **fields):
    bundle = ModelBundle.load(tiny_llama_dir)
    with torch.no_grad():  # block 1's query projection gets 16 loud input columns: the outlier block
        bundle.model.model.layers[1].self_attn.q_proj.weight[:, :16] *= 10
    config = Prune(sparsity=0.5, method="wanda", allocation="owl", **fields)
    return run_prune(bundle, config, _ctx(tmp_path, lm_data))


def test_owl_prunes_the_outlier_block_less_and_keeps_overall_sparsity(tiny_llama_dir, tmp_path, lm_data):
    out = _owl_prune(tiny_llama_dir, tmp_path, lm_data)
    facts = out.facts
    blocks = facts["block_sparsity"]
    assert facts["block_outlier_ratio"]["model.layers.1"] > facts["block_outlier_ratio"]["model.layers.0"]
    assert blocks == {"model.layers.0": pytest.approx(0.58), "model.layers.1": pytest.approx(0.42)}
    per_layer = facts["per_layer_sparsity"]
    assert per_layer["model.layers.1.mlp.down_proj"] == pytest.approx(0.42, abs=0.02)
    assert per_layer["model.layers.0.mlp.down_proj"] == pytest.approx(0.58, abs=0.02)
    assert facts["measured_sparsity_pruned_layers"] == pytest.approx(0.5, abs=0.01)


def test_owl_block_sparsities_reach_the_report(lm_recipe):
    lm_recipe["stages"] = [{"type": "prune", "method": "wanda", "sparsity": 0.5, "allocation": "owl"}]
    report = run(lm_recipe, show_progress=False)
    blocks = report.final.stage_info["block_sparsity"]
    assert sum(blocks.values()) / len(blocks) == pytest.approx(0.5, abs=1e-6)
    md = (Path(lm_recipe["output_dir"]) / "report.md").read_text()
    assert "sparsity per block (owl): 0: " in md


def test_owl_allocation_that_misses_the_target_is_a_stage_error(tiny_llama_dir, tmp_path, lm_data, monkeypatch):
    from compress.pruning import owl

    monkeypatch.setattr(owl, "block_sparsities", lambda ratios, target, spread: dict.fromkeys(ratios, 0.3))
    with pytest.raises(StageError, match=r"owl allocation pruned 0\.29\d* of the selected weights overall, "
                                         r"not the target 0\.5"):
        _owl_prune(tiny_llama_dir, tmp_path, lm_data)


@pytest.mark.parametrize(("fields", "message"), [
    ({"structure": "n:m", "allocation": "owl"},
     "allocation: applies to structure unstructured only \\(this stage.s structure is n:m\\); remove it"),
    ({"sparsity": 0.5, "allocation": "owl", "layer_sparsity": {"q_proj": 0.2}},
     "allocation: owl chooses each block's sparsity itself"),
    ({"sparsity": 0.95, "allocation": "owl"}, r"owl_spread: sparsity 0.95 ± 0.08 leaves \[0, 1\)"),
    ({"sparsity": 0.5, "owl_spread": 0.1}, "owl_spread: only used with allocation: owl"),
])
def test_owl_settings_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Prune(**fields)



@pytest.mark.parametrize("structure", ["unstructured", "n:m"])
def test_sequential_wanda_measures_each_block_on_the_pruned_blocks_before_it(tiny_llama_dir, tmp_path, lm_data,
                                                                             structure):
    from compress.calibration import calibration_batches, input_norms

    fields = {"sparsity": 0.5} if structure == "unstructured" else {"structure": "n:m", "pattern": "2:4"}
    ctx = _ctx(tmp_path, lm_data)
    seq = run_prune(ModelBundle.load(tiny_llama_dir), Prune(method="wanda", sequential=True, **fields), ctx)
    one_pass = run_prune(ModelBundle.load(tiny_llama_dir), Prune(method="wanda", **fields), ctx)
    pruned, dense = seq.bundle.model, ModelBundle.load(tiny_llama_dir).model
    # q/k/v read their block's normed input, which in the pruned model has passed through every pruned
    # block before: the sequential masks are Wanda's scores of the dense weights on exactly those inputs.
    qkv = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"]
    norms = input_norms(pruned, {n: pruned.get_submodule(n) for n in qkv},
                        calibration_batches(seq.bundle, lm_data, 16, ctx.seed))
    for name in qkv:
        score = wanda_score(dense.get_submodule(name).weight, norms[name])
        expected = unstructured_mask(score, 0.5, per_row=True) if structure == "unstructured" else nm_mask(score, 2, 4)
        assert torch.equal(seq.bundle.masks[f"{name}.weight"], expected), name
    # Block 0 sees the same inputs either way; block 1 does not, and the one-pass masks differ there.
    assert all(torch.equal(seq.bundle.masks[k], one_pass.bundle.masks[k]) for k in seq.bundle.masks
               if k.startswith("model.layers.0.self_attn"))
    assert any(not torch.equal(seq.bundle.masks[k], one_pass.bundle.masks[k]) for k in seq.bundle.masks
               if k.startswith("model.layers.1."))
    assert seq.facts["measured_sparsity_pruned_layers"] == 0.5


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_sequential_is_only_for_wanda(method):
    with pytest.raises(ValueError, match=f"sequential: only wanda takes it \\({method} "):
        Prune(sparsity=0.5, method=method, sequential=True)
