"""The runner end to end on tiny models: reports, manifest, resume, folder safety, bad data."""

import dataclasses
import json
from pathlib import Path

import pytest

from compress import DataError, RecipeError, registry, run
from compress.errors import RunFolderError
from compress.report.schema import SCHEMA_VERSION

FAST = {"type": "finetune", "method": "full", "lr": 5e-3, "max_steps": 4, "batch_size": 8}


def _count_calls(monkeypatch, stage_type="finetune", fail=False):
    calls = []
    entry = registry.get_stage(stage_type)

    def wrapped(bundle, config, ctx):
        calls.append(config)
        if fail:
            raise RuntimeError("stage exploded")
        return entry.run(bundle, config, ctx)

    monkeypatch.setitem(registry._STAGES, stage_type, dataclasses.replace(entry, run=wrapped))
    return calls


def test_run_writes_report_manifest_and_stage_folders(cls_recipe):
    cls_recipe["stages"] = [FAST, {**FAST, "name": "second"}]
    report = run(cls_recipe)
    out = Path(cls_recipe["output_dir"])

    assert [p.name for p in report.points] == ["baseline", "01-finetune", "02-finetune"]
    assert report.status == "complete" and report.schema_version == SCHEMA_VERSION
    base, final = report.baseline, report.final
    assert 0 <= final.accuracy.accuracy <= 1 and 0 <= final.accuracy.macro_f1 <= 1
    assert final.accuracy.agreement is not None and base.accuracy.agreement is None
    assert base.size.parameters == final.size.parameters > 0
    assert final.size.disk_bytes > 0 and final.size.bits_per_weight == pytest.approx(32, rel=0.05)
    assert final.speed.latency_b1_ms > 0 and final.speed.batch_size == 4 and final.speed.seq_len == 16
    assert final.stage_info["steps"] == 4 and final.stage_info["trainable_parameters"] > 0

    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 0
    for lib in ("python", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        assert lib in manifest["environment"]["versions"] or lib == "python"
    assert manifest["environment"]["python"]
    assert [s["dir"] for s in manifest["stages"]] == ["01-finetune", "02-finetune"]
    assert all(s["seconds"] > 0 for s in manifest["stages"])
    assert manifest["recipe"]["stages"][1]["name"] == "second"

    for folder in ("01-finetune", "02-finetune"):
        assert (out / folder / "stage.json").exists() and (out / folder / "model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    md = (out / "report.md").read_text()
    assert "| baseline |" in md and "| 02-finetune |" in md and "×" in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["points"][2]["accuracy"]["accuracy"] == final.accuracy.accuracy


def test_causal_lm_run_reports_perplexity(lm_recipe):
    lm_recipe["stages"] = [{**FAST, "max_steps": 20, "lr": 1e-2}]
    report = run(lm_recipe)
    assert report.baseline.accuracy.perplexity > report.final.accuracy.perplexity > 1


def test_resume_skips_finished_stages_and_reproduces_metrics(cls_recipe, monkeypatch):
    cls_recipe["stages"] = [FAST, FAST]
    first = run(cls_recipe)
    calls = _count_calls(monkeypatch)
    again = run(cls_recipe, resume=True)
    assert calls == []
    assert [p.model_dump() for p in again.points] == [p.model_dump() for p in first.points]


def test_resume_after_a_failed_stage_runs_only_what_is_left(cls_recipe, monkeypatch):
    cls_recipe["stages"] = [FAST, {**FAST, "lr": 1e-3}]
    out = Path(cls_recipe["output_dir"])
    entry = registry.get_stage("finetune")

    def fail_second(bundle, config, ctx):
        if config.lr == 1e-3:
            raise RuntimeError("stage exploded")
        return entry.run(bundle, config, ctx)

    monkeypatch.setitem(registry._STAGES, "finetune", dataclasses.replace(entry, run=fail_second))
    with pytest.raises(RuntimeError, match="stage exploded"):
        run(cls_recipe)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and "stage exploded" in manifest["error"]
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
    assert (out / "01-finetune" / "stage.json").exists() and not (out / "02-finetune").exists()

    monkeypatch.setitem(registry._STAGES, "finetune", entry)  # the stage works again
    calls = _count_calls(monkeypatch)
    report = run(cls_recipe, resume=True)
    assert [c.lr for c in calls] == [1e-3]
    assert [p.name for p in report.points] == ["baseline", "01-finetune", "02-finetune"]


def test_resume_refuses_a_changed_stage(cls_recipe):
    cls_recipe["stages"] = [FAST]
    run(cls_recipe)
    with pytest.raises(RunFolderError, match=r"stage 1 \(finetune\).*stages\[0\].lr: 0.005 -> 0.001"):
        run(cls_recipe, overrides=["stages[0].lr=0.001"], resume=True)


def test_output_folder_of_another_run_is_refused_unless_overwrite(cls_recipe):
    run(cls_recipe)
    with pytest.raises(RunFolderError, match="already holds a run of 'tiny'; pass --resume"):
        run(cls_recipe)
    with pytest.raises(RunFolderError, match="belongs to run 'tiny'; pass --overwrite"):
        run({**cls_recipe, "name": "other"})
    report = run({**cls_recipe, "name": "other"}, overwrite=True)
    assert report.name == "other"
    assert json.loads((Path(cls_recipe["output_dir"]) / "run.json").read_text())["name"] == "other"


def test_non_run_folder_is_never_overwritten(cls_recipe):
    out = Path(cls_recipe["output_dir"])
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="holds no compress run"):
        run(cls_recipe, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"


def test_missing_column_lists_columns_and_writes_nothing(cls_recipe):
    cls_recipe["data"]["label_column"] = "sentiment"
    with pytest.raises(DataError, match=r"data.label_column: column 'sentiment' is not in split 'train' "
                                        r"\(columns: text, label\)"):
        run(cls_recipe)
    assert not Path(cls_recipe["output_dir"]).exists()


def test_empty_split_is_refused(cls_recipe, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    cls_recipe["data"]["source"] = str(empty)
    with pytest.raises(DataError, match="is empty"):
        run(cls_recipe)
    assert not Path(cls_recipe["output_dir"]).exists()


def test_undecodable_text_suggests_encoding(cls_recipe, tmp_path):
    bad = tmp_path / "latin.csv"
    bad.write_bytes("text,label\n".encode() + "caf\xe9 good,positive\n".encode("latin-1") * 20)
    cls_recipe["data"]["source"] = str(bad)
    with pytest.raises(DataError, match="set data.encoding"):
        run(cls_recipe)


def test_stage_check_problems_come_before_any_work(cls_recipe, monkeypatch):
    entry = registry.get_stage("finetune")
    seen = []

    def check(bundle, config, ctx):
        seen.append(bundle.model.config.hidden_size)
        rank = getattr(config, "rank", 0)  # FAST is full fine-tuning, which has no rank
        return [f"rank: {rank} is too large for this model; use <= 16"] if rank > 16 else []

    monkeypatch.setitem(registry._STAGES, "finetune", dataclasses.replace(entry, check=check))
    calls = _count_calls(monkeypatch)
    lora = {**FAST, "method": "lora"}  # rank belongs to LoRA's config (full fine-tuning refuses it)
    cls_recipe["stages"] = [FAST, {**lora, "rank": 64}, {**lora, "rank": 32}]
    with pytest.raises(RecipeError) as info:
        run(cls_recipe)
    assert info.value.problems == ["stages[1].rank: 64 is too large for this model; use <= 16",
                                   "stages[2].rank: 32 is too large for this model; use <= 16"]
    assert seen == [64, 64, 64] and calls == []
    assert not Path(cls_recipe["output_dir"]).exists()


def test_evaluation_can_be_limited(cls_recipe):
    cls_recipe["eval"].update(after_each_stage=False, speed=False)
    cls_recipe["stages"] = [FAST]
    report = run(cls_recipe)
    assert [p.name for p in report.points] == ["baseline"]
    assert report.baseline.speed is None and report.baseline.accuracy is not None
