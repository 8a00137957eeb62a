"""SparseGPT: exact sparsity and patterns, lower layer-output error than mask-only methods, block order."""

from __future__ import annotations

import pytest
import torch

import compress.stages  # noqa: F401  (registers the stages)
from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.data import load_data
from compress.pruning.masks import check_nm, nm_mask, unstructured_mask, wanda_score
from compress.calibration.sequential import sequential_groups
from compress.pruning.sparsegpt import sparsegpt_prune
from compress.recipe import DataSpec
from compress.stages.prune import Prune, run_prune


def _layer_and_inputs(rows: int = 32, cols: int = 64, tokens: int = 512):
    gen = torch.Generator().manual_seed(0)
    # Correlated inputs with a few loud channels, as in trained transformers.
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mix
    x[:, :4] *= 10
    return torch.randn(rows, cols, generator=gen), x


def _output_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ pruned.T) ** 2).sum())


def test_sparsegpt_has_the_exact_sparsity_and_the_lowest_output_error():
    weight, x = _layer_and_inputs()
    pruned, keep = sparsegpt_prune(weight, x.T @ x / len(x), sparsity=0.5)
    assert int((~keep).sum()) == weight.numel() // 2
    assert torch.equal(pruned != 0, keep)
    norms = x.norm(dim=0)
    magnitude = weight * unstructured_mask(weight.abs(), 0.5, per_row=False)
    wanda = weight * unstructured_mask(wanda_score(weight, norms), 0.5, per_row=True)
    errors = {name: _output_error(weight, w, x) for name, w in
              (("sparsegpt", pruned), ("wanda", wanda), ("magnitude", magnitude))}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_two_four_and_its_update_beat_the_same_mask_without_update():
    weight, x = _layer_and_inputs()
    pruned, keep = sparsegpt_prune(weight, x.T @ x / len(x), nm=(2, 4))
    assert check_nm(pruned, 2, 4) and ((~keep).reshape(32, -1, 4).sum(-1) == 2).all()
    # The kept weights moved: same mask, original values, is worse than SparseGPT's update.
    assert _output_error(weight, pruned, x) < _output_error(weight, weight * keep, x)
    wanda24 = weight * nm_mask(wanda_score(weight, x.norm(dim=0)), 2, 4)
    assert _output_error(weight, pruned, x) < _output_error(weight, wanda24, x)


def test_inputs_that_never_fire_do_not_break_the_factorisation():
    weight, x = _layer_and_inputs()
    x[:, 10] = 0
    pruned, keep = sparsegpt_prune(weight, x.T @ x / len(x), sparsity=0.5)
    assert torch.isfinite(pruned).all() and not keep[:, 10].any()


def test_layers_are_grouped_by_block_in_model_order():
    lin = torch.nn.Linear(2, 2)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
             "model.layers.1.mlp.up_proj", "pooler.dense"]
    groups = list(sequential_groups(dict.fromkeys(names, lin)))
    assert [(block, list(g)) for block, g in groups] == [
        ("model.layers.0", names[:2]), ("model.layers.1", names[2:3]), (None, names[3:])]


def test_prune_stage_with_sparsegpt_on_a_llama(tiny_llama_dir, lm_text, tmp_path):
    data = load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2, calibration_samples=16),
                     "causal-lm")
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, show_progress=False)
    before = {n: p.detach().clone() for n, p in ModelBundle.load(tiny_llama_dir).model.named_parameters()}
    out = run_prune(ModelBundle.load(tiny_llama_dir), Prune(method="sparsegpt", sparsity=0.5), ctx)
    linears = {n: m for n, m in out.bundle.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    for name, lin in linears.items():
        assert torch.equal(out.bundle.masks[f"{name}.weight"], lin.weight != 0), name
        kept = lin.weight != 0
        assert abs(float(kept.float().mean()) - 0.5) < 0.02, name
        assert not torch.equal(lin.weight[kept], before[f"{name}.weight"][kept]), name  # weights were updated
    info = out.facts
    assert info["method"] == "sparsegpt" and info["calibration_samples"] == 16
    out24 = run_prune(ModelBundle.load(tiny_llama_dir), Prune(method="sparsegpt", structure="n:m"), ctx)
    assert all(check_nm(m.weight, 2, 4) for n, m in out24.bundle.model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head")


def test_sparsegpt_bad_input_is_named_before_any_work(tiny_llama_dir, tmp_path):
    from pydantic import ValidationError

    from compress.stages.prune import check_prune

    with pytest.raises(ValidationError, match=r"method: applies to structure unstructured / n:m only \(this "
                                              r"stage's structure is ffn\); remove it"):
        Prune(structure="ffn", sparsity=0.25, method="sparsegpt")
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=None, show_progress=False)
    assert check_prune(ModelBundle.load(tiny_llama_dir), Prune(method="sparsegpt", sparsity=0.5), ctx) == [
        ("method: sparsegpt needs calibration data (activations on real inputs) but the recipe has no data "
        "section; add one or use method: magnitude")]


# gemma2: sliding-window masks and a cache that transformers 5.24 passes as `cache=` (a replay that
# kept it appended to it, doubling the keys); modernbert: local attention, no `layers.N` cache.
@pytest.mark.parametrize("kind", ["llama", "bert", "gemma2", "modernbert", "gpt_neox"])
def test_replaying_blocks_sees_what_a_full_forward_sees(kind, request, tmp_path):
    """With nothing pruned, the Hessians from captured-and-replayed blocks equal full-pass ones, for
    every block: the replay hands each block exactly what the model would (masks, positions)."""
    from compress.calibration import calibration_batches
    from compress.calibration import input_hessians as hessians
    from compress.pruning.sparsegpt import prune_sequentially
    from compress.pruning.targets import select_linears
    from compress.testing import TINY_ARCHITECTURES, make_tiny_model

    if kind in ("llama", "bert"):
        model_dir = request.getfixturevalue({"llama": "tiny_llama_dir", "bert": "tiny_bert_dir"}[kind])
    else:
        model_dir = make_tiny_model(kind, tmp_path / kind)
    task = TINY_ARCHITECTURES[kind][0]
    text = "lm_text" if task == "causal-lm" else "sentiment_csv"
    bundle = ModelBundle.load(model_dir)
    data = load_data(DataSpec(source=str(request.getfixturevalue(text)), max_length=32, eval_size=0.2), task)
    batches = calibration_batches(bundle, data, 12, seed=0, batch_size=4)
    batches[0]["attention_mask"][0, -5:] = 0  # padding must be left out of both
    linears = select_linears(bundle.model, None, None)
    expected = hessians(bundle.model, linears, batches)
    seen = {}

    def keep_all(name, lin, hessian):
        seen[name] = hessian
        return torch.ones_like(lin.weight, dtype=torch.bool)

    assert [n for n, _ in prune_sequentially(bundle.model, linears, batches, keep_all)] == list(linears)
    for name in linears:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-4, atol=1e-5)
