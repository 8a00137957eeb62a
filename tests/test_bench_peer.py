"""bench/bench_peer.py's pure helpers: the calibration-blocks file both tools read, the workers' result
files, the pair ratios, the output checks and the report. Nothing here needs llm-compressor."""

from __future__ import annotations

import json

import pytest
import torch

from bench.peer_checks import check_output, max_levels, nm_violations, target_linears
from bench.peer_io import (
    PEER_PYTHON_ENV,
    pair_ratios,
    peer_python,
    read_blocks,
    read_result,
    write_blocks,
    write_result,
)
from bench.peer_report import method_rows, render_markdown


def test_blocks_round_trip_exactly(tmp_path):
    blocks = [[5, 0, 17, 4095], [1, 2, 3, 4]]
    write_blocks(tmp_path / "b.json", blocks, {"seed": 1})
    back, meta = read_blocks(tmp_path / "b.json")
    assert back == blocks and meta == {"seed": 1}


@pytest.mark.parametrize("blocks, message", [
    ([], "non-empty"),
    ([[1, 2], [3]], "block 1 is not a list of 2"),
    ([[1, 2], [3, -1]], "block 1 holds something other than non-negative ints"),
    ([[1, 2.0]], "block 0 holds"),
])
def test_bad_blocks_are_refused_when_written(tmp_path, blocks, message):
    with pytest.raises(ValueError, match=message):
        write_blocks(tmp_path / "b.json", blocks, {})
    assert not (tmp_path / "b.json").exists()


def test_a_file_of_another_format_is_refused(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"blocks": [[1]]}))
    with pytest.raises(ValueError, match="not a calibration-blocks file"):
        read_blocks(tmp_path / "b.json")


def _result(**change):
    return {"tool": "compress", "method": "Wanda 50%", "stage_seconds": 1.5, "stage_cpu_seconds": 2.9,
            "threads": 2, **change}


def test_result_round_trip_and_its_checks(tmp_path):
    write_result(tmp_path / "r.json", _result())
    assert read_result(tmp_path / "r.json")["stage_seconds"] == 1.5
    (tmp_path / "bad.json").write_text(json.dumps(_result(stage_seconds=0)))
    with pytest.raises(ValueError, match="stage_seconds is 0, not a positive"):
        read_result(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text(json.dumps({"tool": "compress"}))
    with pytest.raises(ValueError, match="lacks method, stage_seconds"):
        read_result(tmp_path / "short.json")
    with pytest.raises(ValueError, match="the worker wrote no result"):
        read_result(tmp_path / "missing.json")


def test_missing_peer_python_names_the_install_and_the_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"llmcompressor==0.14.*.*{PEER_PYTHON_ENV}"):
        peer_python({PEER_PYTHON_ENV: str(tmp_path / "nope" / "python")})
    fake = tmp_path / "python"
    fake.write_text("")
    assert peer_python({PEER_PYTHON_ENV: str(fake)}) == fake


def test_pair_ratios_pair_by_round_and_skip_unpaired():
    rows = [{"round": 1, "tool": "compress", "stage_seconds": 3.0},
            {"round": 1, "tool": "llmcompressor", "stage_seconds": 2.0},
            {"round": 2, "tool": "llmcompressor", "stage_seconds": 4.0},
            {"round": 2, "tool": "compress", "stage_seconds": 2.0},
            {"round": 3, "tool": "compress", "stage_seconds": 9.0}]
    assert pair_ratios(rows) == [1.5, 0.5]


def test_nm_and_level_counts():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm_violations(w, 2, 4) == 1  # the second group keeps 3 of 4
    assert max_levels(torch.tensor([[0.5, 0.5, 1.0, -1.0]]), 2) == 2
    assert max_levels(torch.arange(32.0).reshape(1, 32), 16) == 16


def _tiny():
    torch.manual_seed(0)
    model, body = torch.nn.Module(), torch.nn.Module()
    body.layers = torch.nn.ModuleList([torch.nn.Module()])
    body.layers[0].proj = torch.nn.Linear(8, 4, bias=False)
    model.model, model.head = body, torch.nn.Linear(8, 4, bias=False)
    return model


def test_check_output_accepts_a_kept_promise_and_names_the_broken_layer():
    model = _tiny()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    assert target_linears(dense) == ["model.layers.0.proj"]
    stage = {"type": "prune", "structure": "n:m", "pattern": "2:4"}
    with torch.no_grad():
        w = model.model.layers[0].proj.weight
        w.copy_(w * torch.tensor([1.0, 1.0, 0.0, 0.0] * 2))
    assert check_output(model, "SparseGPT 2:4", stage, dense) == {"target_layers": 1, "sparsity": 0.5}
    with torch.no_grad():
        model.model.layers[0].proj.weight[0, 2] = 1.0
    with pytest.raises(ValueError, match="model.layers.0.proj has 1 groups of 4 with more than 2"):
        check_output(model, "SparseGPT 2:4", stage, dense)
    with pytest.raises(ValueError, match="0.4688 sparse, not 0.5"):  # 15 of 32 zeros after the change above
        check_output(model, "Wanda 50%", {"type": "prune", "sparsity": 0.5}, dense)
    quant = {"type": "quantize", "bits": 1, "group_size": 4}
    with pytest.raises(ValueError, match="group with 4 distinct values, more than 2\\^1"):
        check_output(model, "RTN", quant, dense)
    with pytest.raises(ValueError, match="lacks 1 target layers"):
        check_output(model, "RTN", quant, dense, changed={"head.weight"})
    model.load_state_dict(dense)
    with pytest.raises(ValueError, match="1 of 1 target layers are unchanged"):
        check_output(model, "RTN", {"type": "quantize", "bits": 8, "group_size": 4}, dense)


def test_check_output_takes_owl_sparsity_overall_not_per_layer():
    model = _tiny()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    owl = {"type": "prune", "sparsity": 0.5, "allocation": "owl"}
    with torch.no_grad():  # 12 of 32 zeros: 0.375 overall, under a uniform 0.5 and under OWL's overall 0.5
        model.model.layers[0].proj.weight.view(-1)[:12] = 0.0
    with pytest.raises(ValueError, match="0.3750 sparse overall, not 0.5"):
        check_output(model, "OWL-Wanda 50%", owl, dense)
    with torch.no_grad():
        model.model.layers[0].proj.weight.view(-1)[:16] = 0.0
    facts = check_output(model, "OWL-Wanda 50%", owl, dense)
    assert facts["sparsity"] == 0.5 and facts["block_sparsity"] == [0.5]  # what OWL gave each block


def test_owl_allocations_are_shown_side_by_side_with_their_largest_difference():
    data = _report_data()
    data["methods"]["OWL-Wanda 70%"] = [{"type": "prune", "allocation": "owl"}, {"modifier": "wanda"}]
    data["quality"]["methods"]["OWL-Wanda 70%"] = {"compress_ppl": 5.0, "llmcompressor_ppl": 6.0, "checks": {
        "compress": {"sparsity": 0.7, "block_sparsity": [0.6, 0.8]},
        "llmcompressor": {"sparsity": 0.7, "block_sparsity": [0.605, 0.795]}}}
    md = render_markdown(data)
    assert "| OWL-Wanda 70% | 0.600 – 0.800 | 0.605 – 0.795 | 0.0050 | 0.0050 |" in md
    assert "agree on every block within 0.0050" in md
    data["quality"]["methods"]["OWL-Wanda 70%"]["checks"]["llmcompressor"]["block_sparsity"] = [0.65, 0.75]
    assert "allocations differ by up to 0.0500 on a block" in render_markdown(data)
    assert "'block_sparsity'" not in md  # the per-block lists stay out of the checks' one-line summaries
    assert "patch_owl" in md  # the peer's OWL needed patching: said where its rows are


def test_re_evaluating_kept_outputs_must_give_the_same_perplexity(tmp_path, monkeypatch):
    import bench.bench_peer as bp

    data = _report_data()
    (tmp_path / "peer.json").write_text(json.dumps(data))
    monkeypatch.setattr(bp, "REPORTS", tmp_path)

    class Same:
        def method(self, label):
            return {**data["quality"]["methods"][label], "checks": {"compress": {"sparsity": 0.5, "new": 1}}}

    monkeypatch.setattr(bp, "Evaluator", Same)
    bp.reevaluate(["Wanda 50%"])
    assert json.loads((tmp_path / "peer.json").read_text())["quality"]["methods"]["Wanda 50%"]["checks"]["compress"][
        "new"] == 1
    assert (tmp_path / "peer.md").exists()

    class Moved(Same):
        def method(self, label):
            return {**super().method(label), "compress_ppl": 12.5}

    monkeypatch.setattr(bp, "Evaluator", Moved)
    with pytest.raises(SystemExit, match="compress_ppl 12.5 now, 12.0 when it ran"):
        bp.reevaluate(["Wanda 50%"])


def test_every_peer_row_names_a_modifier_its_worker_builds():
    """The peer worker's modifier() branches on these names; a row with another would fail only in the
    peer's venv, after the compress side of its pair had run."""
    from bench.bench_peer import METHODS

    for label, (stage, peer) in METHODS.items():
        assert peer["modifier"] in {"wanda", "sparsegpt", "gptq", "rtn", "awq"}, label
        assert ("owl_m" in peer) == (stage.get("allocation") == "owl"), label
        if stage["type"] == "quantize":
            assert (stage["bits"], stage["group_size"]) == (peer["bits"], peer["group_size"]), label


def _report_data():
    rows = []
    for r, (mine, theirs) in enumerate([(2.0, 1.0), (3.0, 1.5)], start=1):
        for tool, s in (("compress", mine), ("llmcompressor", theirs)):
            rows.append({"tool": tool, "method": "Wanda 50%", "stage_seconds": s, "stage_cpu_seconds": 2 * s,
                         "round": r})
    quality = {"dense": 10.0, "eval_blocks": 90, "methods": {"Wanda 50%": {
        "compress_ppl": 12.0, "llmcompressor_ppl": 12.5, "checks": {"compress": {"sparsity": 0.5}}}}}
    return {"rounds": 2, "started": "now", "machine": "cpu", "load_at_end": [1.0, 2.0, 3.0], "threads": 2,
            "peer": {"llmcompressor": "0.14.0", "compressed-tensors": "x", "transformers": "y", "torch": "z"},
            "calibration": {"samples": 128, "block_tokens": 64}, "eval_tweets": 300,
            "methods": {"Wanda 50%": [{"type": "prune"}, {"modifier": "wanda"}]}, "rows": rows,
            "quality": quality}


def test_report_shows_pair_ratios_their_median_and_the_parity_verdict():
    data = _report_data()
    [row] = method_rows(data)
    assert row["ratios"] == [2.0, 2.0] and row["ratio"] == 2.0
    md = render_markdown(data)
    assert "| Wanda 50% | 12.0 | 12.5 | -4.00% | 2.00, 3.00 | 1.00, 1.50 | 2.00, 2.00 | 2.00 | **no** |" in md
    data["rows"][0]["stage_seconds"] = 1.2  # round 1 ratio 1.2, round 2 ratio 2.0: median 1.6 still fails
    assert "| 1.60 | **no** |" in render_markdown(data)
    data["rows"][2]["stage_seconds"] = 1.5  # ratios 1.2 and 1.0: median 1.1 passes
    assert "| 1.10 | yes |" in render_markdown(data)
