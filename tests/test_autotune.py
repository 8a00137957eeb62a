"""autotune: candidates validated up front, shared prefixes reused, frontier and winner written."""

import json

import pytest
import yaml

from compress import Recipe, RecipeError, load_recipe
from compress.autotune import autotune, candidates, parse_budget, parse_space, within_budget
from compress.cli import main

STEP = {"type": "finetune", "method": "full", "lr": 5e-3, "max_steps": 3, "batch_size": 8}


def test_space_and_budget_parsing():
    assert parse_space(["stages[1].lr=0.1,0.2", "seed=[1, 2]"]) == {"stages[1].lr": [0.1, 0.2], "seed": [1, 2]}
    assert parse_budget(["accuracy_drop=0.01"]) == {"accuracy_drop": 0.01}
    with pytest.raises(RecipeError, match="use accuracy_drop=VALUE or perplexity_ratio=VALUE"):
        parse_budget(["acc=1"])
    # Later stages vary fastest, so neighbours share the longest prefix.
    assert candidates({"stages[1].x": [1, 2], "stages[0].y": ["a", "b"]}) == [
        {"stages[0].y": "a", "stages[1].x": 1}, {"stages[0].y": "a", "stages[1].x": 2},
        {"stages[0].y": "b", "stages[1].x": 1}, {"stages[0].y": "b", "stages[1].x": 2}]


def test_within_budget():
    fig = {"accuracy": 0.80, "baseline_accuracy": 0.805, "perplexity": None, "baseline_perplexity": None}
    assert within_budget(fig, {"accuracy_drop": 0.01}) and not within_budget(fig, {"accuracy_drop": 0.001})
    assert not within_budget(fig, {"perplexity_ratio": 1.1})


def test_invalid_candidates_are_reported_before_any_run(cls_recipe, tmp_path):
    cls_recipe["stages"] = [STEP]
    with pytest.raises(RecipeError) as info:
        autotune(cls_recipe, tmp_path / "at", space={"stages[0].lr": [0.1, -1, 0]}, budget={"accuracy_drop": 1})
    assert len(info.value.problems) == 2 and "stages[0].lr: must be > 0" in info.value.problems[0]
    assert not (tmp_path / "at").exists()


def test_autotune_reuses_prefixes_and_writes_winner(cls_recipe, tmp_path, capsys):
    cls_recipe["stages"] = [STEP, {**STEP, "lr": 1e-3}]
    cls_recipe["eval"]["speed"] = False
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cls_recipe))
    out = tmp_path / "at"
    code = main(["autotune", str(path), "--space", "stages[1].lr=0.001,0.002,0.003", "--budget",
                 "accuracy_drop=0.5", "--output", str(out), "--quiet"])
    assert code == 0
    summary = json.loads((out / "autotune.json").read_text())
    assert summary["candidates"] == 3
    # Stage 1 is shared: it runs once and is reused by the two later candidates.
    assert summary["stages_reused"] == 2
    for row in summary["rows"]:
        report = json.loads(open(row["report"]).read())
        drop = report["points"][0]["accuracy"]["accuracy"] - report["points"][-1]["accuracy"]["accuracy"]
        assert row["feasible"] == (drop <= 0.5)
    winner = load_recipe(out / "winner.yaml")
    assert winner.stages[1].lr == summary["winner"]["settings"]["stages[1].lr"]
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 candidates in" in (out / "autotune.md").read_text()
    assert "winner c0" in capsys.readouterr().out


def test_autotune_can_vary_a_quantization_scheme_and_its_winner_reloads(cls_recipe, tmp_path):
    # A full dump of the base recipe sets every default (double_quant, group_size, ...), which a
    # quantize stage refuses for schemes they do not apply to; candidates carry only explicit fields.
    cls_recipe["stages"] = [{"type": "quantize", "scheme": "int8-dynamic"}]
    cls_recipe["eval"]["speed"] = False
    out = tmp_path / "at"
    summary = autotune(cls_recipe, out, space={"stages[0].scheme": ["int8-dynamic", "int8-weight"],
                                               "stages[0].embeddings": ["none", "int8"]},
                       budget={"accuracy_drop": 0.5})
    assert summary["candidates"] == 4 and not any(r.get("error") for r in summary["rows"])
    winner = load_recipe(out / "winner.yaml")
    assert winner.stages[0].scheme == summary["winner"]["settings"]["stages[0].scheme"]


def test_a_python_recipe_takes_overrides_that_switch_the_scheme():
    from compress.stages import Quantize

    recipe = Recipe(name="r", model={"path": "m"}, data={"source": "d.csv"}, stages=[Quantize(scheme="nf4")])
    switched = load_recipe(recipe, ["stages[0].scheme=int8-weight"])
    assert switched.stages[0].scheme == "int8-weight"
    assert load_recipe(switched.to_dict(explicit_only=True)).stages[0].type == "quantize"


def test_winner_ties_break_on_the_side_by_side_speedup_not_the_alone_timing():
    from compress.autotune import pick_winner

    rows = [{"candidate": "c0", "feasible": True, "disk_bytes": 100, "latency_bn_ms": 5.0, "speedup_bn": 1.1},
            {"candidate": "c1", "feasible": True, "disk_bytes": 100, "latency_bn_ms": 9.0, "speedup_bn": 1.9},
            {"candidate": "c2", "feasible": False, "disk_bytes": 50, "speedup_bn": 3.0},
            {"candidate": "c3", "feasible": True, "disk_bytes": 120, "speedup_bn": 4.0}]
    assert pick_winner(rows)["candidate"] == "c1"  # c0 looked faster alone; paired rounds say c1
    assert pick_winner([r for r in rows if not r["feasible"]]) is None
