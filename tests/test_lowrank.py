"""Low-rank factorisation: exact at full rank, energy thresholds, save/load round trip, bad ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress.stages  # noqa: F401
from compress import load_recipe, run
from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.errors import RecipeError
from compress.stages.lowrank import LowRank, LowRankLinear, factorize, run_lowrank

IDS = torch.tensor([[9, 12, 30, 8, 21, 15, 11, 7]])


def _ctx(tmp_path) -> RunContext:
    return RunContext(output_dir=tmp_path, seed=0, device="cpu", show_progress=False)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_full_rank_is_exact_and_truncation_is_optimal():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    x = torch.randn(5, 24)
    full, energy = factorize(linear, 16, None)
    assert energy == pytest.approx(1.0) and torch.allclose(full(x), linear(x), atol=1e-5)
    low, _ = factorize(linear, 4, None)
    w = low.second.weight @ low.first.weight
    s = torch.linalg.svdvals(linear.weight.detach())
    # Eckart–Young: the rank-4 error is exactly the energy of the dropped singular values.
    assert torch.linalg.matrix_norm(linear.weight - w).item() == pytest.approx(s[4:].norm().item(), rel=1e-4)


def test_energy_threshold_picks_smallest_rank():
    linear = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5])))
    # squared shares: 9, 4, 1, 0.25 of 14.25 -> 0.632, 0.912, 0.982, 1.0
    assert factorize(linear, None, 0.9)[0].rank == 2
    assert factorize(linear, None, 0.95)[0].rank == 3
    assert factorize(linear, None, 0.6)[0].rank == 1


def test_lowrank_stage_saves_and_reloads_identically(tiny_llama_dir, tmp_path):
    bundle = ModelBundle.load(tiny_llama_dir)
    out = run_lowrank(bundle, LowRank(rank=8, targets=[r"mlp\..*"]), _ctx(tmp_path))
    mlp = out.bundle.model.model.layers[0].mlp
    assert isinstance(mlp.up_proj, LowRankLinear) and mlp.up_proj.first.weight.shape == (8, 64)
    assert not isinstance(out.bundle.model.model.layers[0].self_attn.q_proj, LowRankLinear)
    info = out.facts
    assert info["layers_factorized"] == 6
    row = next(r for r in info["layers"] if r["layer"] == "model.layers.0.mlp.up_proj")
    assert (row["params_before"], row["params_after"]) == (128 * 64, 8 * 64 + 128 * 8)
    assert row["latency_before_ms"] > 0 and row["latency_after_ms"] > 0
    assert sum(p.numel() for p in out.bundle.model.parameters()) == (
        sum(p.numel() for p in ModelBundle.load(tiny_llama_dir).model.parameters()) - 6 * (8192 - 1536))
    before = _logits(out.bundle.model)
    folder = out.bundle.save(tmp_path / "lr")
    assert (folder / "lowrank.json").exists()
    again = ModelBundle.load(folder)
    assert again.format == "lowrank" and isinstance(again.model.model.layers[1].mlp.down_proj, LowRankLinear)
    assert torch.equal(_logits(again.model), before)


def test_lowrank_in_a_run_reports_per_layer_changes(lm_recipe):
    lm_recipe["stages"] = [{"type": "lowrank", "energy": 0.8, "targets": [r"mlp\.(up|gate)_proj"]}]
    lm_recipe["eval"]["speed"] = False
    report = run(lm_recipe, show_progress=False)
    info = report.final.stage_info
    assert info["layers_factorized"] + info["layers_skipped"] == 4
    assert all(r["energy_kept"] >= 0.8 for r in info["layers"])
    assert report.final.size.parameters < report.baseline.size.parameters
    md = Path(lm_recipe["output_dir"], "report.md").read_text()
    assert "factorized_params_ratio=" in md and "layer_latency_ms_after=" in md


def test_rank_larger_than_layer_fails_before_work(lm_recipe):
    lm_recipe["stages"] = [{"type": "lowrank", "rank": 40}]
    with pytest.raises(RecipeError) as err:
        run(lm_recipe, show_progress=False)
    assert str(err.value) == (
        "stages[0].rank: 40 is larger than min(in, out) = 32 of model.layers.0.self_attn.k_proj and 3 other "
        "layer(s); use rank <= 32, an energy threshold, or ignore those layers")


def test_rank_or_energy_exactly_one(lm_recipe):
    lm_recipe["stages"] = [{"type": "lowrank", "rank": 4, "energy": 0.9}]
    with pytest.raises(RecipeError, match="rank: give exactly one of rank"):
        load_recipe(lm_recipe)
