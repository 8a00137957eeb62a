"""Adapter composition: one LoRA adapter per task on one base, combined by peft (TIES, ...) or kept
switchable; every adapter saved as a plain PEFT folder that peft reloads exactly; the retention check
broken on purpose; recipe mistakes named with the field and the fix."""

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from compress import ModelBundle, RecipeError, load_recipe, testing
from compress.context import RunContext
from compress.data import load_data
from compress.errors import StageError
from compress.evaluate.accuracy import evaluate_accuracy
from compress.specs import DataSpec
from compress.stages.compose import Compose, check_compose, check_retention, run_compose

FAST = {"lr": 2e-2, "max_steps": 12, "batch_size": 16, "rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def topic_csv(tmp_path_factory):
    return testing.write_topic_csv(tmp_path_factory.mktemp("data") / "topic.csv", n=240)


@pytest.fixture(scope="module")
def cls_data(sentiment_csv):
    return load_data(DataSpec(source=str(sentiment_csv), label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification")


def _topic(topic_csv, **kw):
    return {"source": str(topic_csv), "label_column": "topic", "max_length": 32, "eval_size": 0.2, **kw}


def _tasks(topic_csv, **topic):
    return [{"name": "sentiment"}, {"name": "topic", "data": _topic(topic_csv), **topic}]


def _ctx(tmp_path, data):
    return RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work",
                      stage_name="01-compose", show_progress=False)


@pytest.fixture(scope="module")
def ties_run(tiny_bert_dir, cls_data, topic_csv, tmp_path_factory):
    """One TIES composition of sentiment (the recipe's data) and topic (its own data), shared by the tests
    that read its outputs."""
    out = tmp_path_factory.mktemp("ties")
    config = Compose(tasks=_tasks(topic_csv), combine="ties", density=0.5, min_retained=None, **FAST)
    result = run_compose(ModelBundle.load(tiny_bert_dir), config, _ctx(out, cls_data))
    return result, out / "adapters" / "01-compose"


def _eval(model, data, tokenizer):
    metrics, _ = evaluate_accuracy(model, data.tokenized("eval", tokenizer), tokenizer, "sequence-classification",
                                   num_labels=data.num_labels)
    return metrics.accuracy


# ------------------------------------------------------------------------------- composition, saved and reloaded


def test_each_adapter_reloads_with_plain_peft_and_scores_what_the_stage_reported(ties_run, tiny_bert_dir,
                                                                                    topic_csv, cls_data):
    result, folder = ties_run
    rows = {r["task"]: r for r in result.facts["composition"]}
    index = json.loads((folder / "compose.json").read_text())
    topic_data = load_data(DataSpec(**_topic(topic_csv)), "sequence-classification", seed=0)
    tokenizer = result.bundle.tokenizer
    for task, data in (("sentiment", cls_data), ("topic", topic_data)):
        assert index["tasks"][task]["labels"] == data.label_names
        for sub, key in (("tasks", "single"), ("composed", "composed")):
            base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(data.label_names))
            model = PeftModel.from_pretrained(base, folder / sub / task)
            # The reloaded adapter (body + the task's own head) scores exactly what the stage measured.
            assert _eval(model, data, tokenizer) == pytest.approx(rows[task][key], abs=1e-6), (task, sub)
    assert set(rows["topic"]) >= {"single", "composed", "retained", "metric"}
    assert rows["topic"]["retained"] == pytest.approx(rows["topic"]["composed"] / rows["topic"]["single"], abs=1e-5)


def test_the_composed_body_is_one_and_each_task_keeps_its_own_head(ties_run):
    from safetensors.torch import load_file

    _, folder = ties_run
    composed = {t: load_file(folder / "composed" / t / "adapter_model.safetensors") for t in ("sentiment", "topic")}
    own = {t: load_file(folder / "tasks" / t / "adapter_model.safetensors") for t in ("sentiment", "topic")}
    body = [k for k in composed["topic"] if "lora_" in k]
    heads = [k for k in composed["topic"] if "lora_" not in k]
    assert body and heads and all("classifier" in k for k in heads)
    for k in body:  # one combined body, shared by both tasks, and not either task's own
        assert torch.equal(composed["sentiment"][k], composed["topic"][k])
    assert any(not torch.equal(composed["topic"][k], own["topic"][k]) for k in body)
    for t in composed:  # each composed adapter carries its task's trained head unchanged
        assert all(torch.equal(composed[t][k], own[t][k]) for k in heads)
    assert not torch.equal(own["sentiment"][heads[0]], own["topic"][heads[0]])


def test_the_stage_hands_on_the_recipes_task_with_the_composed_adapter_merged(ties_run, tiny_bert_dir, cls_data):
    result, folder = ties_run
    merged = result.bundle.model
    assert not hasattr(merged, "peft_config")  # a plain transformers model for later stages
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    peft_model = PeftModel.from_pretrained(base, folder / "composed" / "sentiment").eval()
    batch = result.bundle.tokenizer(["good happy day", "the car was bad"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        diff = (merged(**batch).logits - peft_model(**batch).logits).abs().max()
    assert float(diff) <= 1e-5
    assert result.facts["own_task_composed"] == pytest.approx(_eval(merged, cls_data, result.bundle.tokenizer),
                                                              abs=1e-6)


def test_switch_keeps_every_task_on_its_own_adapter(tiny_bert_dir, cls_data, topic_csv, tmp_path):
    config = Compose(tasks=_tasks(topic_csv), combine="switch", **FAST)
    result = run_compose(ModelBundle.load(tiny_bert_dir), config, _ctx(tmp_path, cls_data))
    folder = tmp_path / "adapters" / "01-compose"
    assert sorted(p.name for p in (folder / "tasks").iterdir()) == ["sentiment", "topic"]
    assert not (folder / "composed").exists()
    rows = {r["task"]: r for r in result.facts["composition"]}
    assert "composed" not in rows["topic"]
    assert result.facts["own_task_single"] == pytest.approx(
        _eval(result.bundle.model, cls_data, result.bundle.tokenizer), abs=1e-6)


def test_causal_lm_tasks_compose_and_reload(tiny_llama_dir, lm_text, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"my {a} fish see very good ." for a in ("big", "red", "blue", "small") * 60) + "\n")
    data = load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2), "causal-lm")
    config = Compose(tasks=[{"name": "grammar"}, {"name": "fish", "data": {"source": str(other), "max_length": 32,
                                                                          "eval_size": 0.2}}],
                     combine="cat", min_retained=None, **FAST)
    result = run_compose(ModelBundle.load(tiny_llama_dir), config, _ctx(tmp_path, data))
    rows = {r["task"]: r for r in result.facts["composition"]}
    assert rows["fish"]["metric"] == "perplexity" and rows["fish"]["single"] < 100
    assert rows["fish"]["retained"] == pytest.approx(rows["fish"]["single"] / rows["fish"]["composed"], abs=1e-5)
    assert result.facts["composed_rank"] == 8  # cat stacks the two rank-4 adapters
    folder = tmp_path / "adapters" / "01-compose" / "composed" / "fish"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), folder).eval()
    ids = result.bundle.tokenizer(["the big cats run ."], return_tensors="pt")
    with torch.inference_mode():
        assert float((model(**ids).logits - result.bundle.model(**ids).logits).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------- the retention check


def test_retention_check_names_the_task_and_the_numbers():
    rows = [{"task": "sentiment", "metric": "accuracy", "single": 0.8, "composed": 0.6, "retained": 0.75},
            {"task": "topic", "metric": "accuracy", "single": 0.9, "composed": 0.9, "retained": 1.0}]
    with pytest.raises(StageError) as err:
        check_retention(rows, 0.95, "compose")
    message = str(err.value)
    assert "sentiment: accuracy 0.6000 composed vs 0.8000 with its own adapter (75.0% kept)" in message
    assert "topic" not in message and "min_retained=0.95" in message
    check_retention(rows, None, "compose")  # null: only reported
    check_retention(rows, 0.75, "compose")


@pytest.mark.slow  # trains two adapters (~20-35 s on the loaded 2-core machine); the unit test above runs by default
def test_a_composition_that_loses_a_task_fails_the_stage(tiny_bert_dir, cls_data, topic_csv, tmp_path):
    """Break it on purpose: subtracting the sentiment adapter (weight -1) from the topic one. With both
    adapters started from the same A, peft's factor-wise linear sum then cancels most of both updates."""
    tasks = [{"name": "sentiment", "weight": -1.0}, {"name": "topic", "data": _topic(topic_csv)}]
    config = Compose(tasks=tasks, combine="linear", min_retained=0.95, **FAST)
    with pytest.raises(StageError, match=r"keeps less than min_retained=0.95 of the single-task score — "
                                         r"(sentiment|topic): accuracy (0\.\d{4}) composed vs (0\.\d{4}) with its "
                                         r"own adapter \((\d+\.\d)% kept\)") as err:
        run_compose(ModelBundle.load(tiny_bert_dir), config, _ctx(tmp_path, cls_data))
    import re

    composed, single, kept = re.search(r"accuracy (\S+) composed vs (\S+) with its own adapter \((\S+)% kept",
                                       str(err.value)).groups()
    assert float(kept) / 100 == pytest.approx(float(composed) / float(single), abs=1e-3) and float(kept) < 95
    assert "The adapters are saved" in str(err.value)
    assert (tmp_path / "adapters" / "01-compose" / "composed" / "sentiment" / "adapter_config.json").exists()


# ------------------------------------------------------------------------------- mistakes, before any work


def _recipe(stage):
    return {"name": "t", "model": {"path": "m"}, "data": {"source": "d.csv"}, "stages": [{"type": "compose", **stage}]}


TOPIC = {"name": "topic", "data": {"source": "t.csv", "label_column": "topic"}}


@pytest.mark.parametrize("stage, expected", [
    ({"tasks": [{"name": "a"}]}, "stages[0].tasks: composing needs two or more tasks; add a task"),
    ({"tasks": [{"name": "a"}, {"name": "a", "data": {"source": "t.csv"}}], "combine": "cat"},
     "stages[0].tasks: names must differ (a repeated)"),
    ({"tasks": [{"name": "a"}, {"name": "b"}], "combine": "cat"},
     ("stages[0].tasks: exactly one task leaves out `data` (it trains on the recipe's data, which the run's "
     "evaluations measure); found 2 (a, b); give the others their data")),
    ({"tasks": [{**TOPIC, "name": "a"}, TOPIC], "combine": "cat"},
     "stages[0].tasks: exactly one task leaves out `data`"),
    ({"tasks": [{"name": "a"}, TOPIC]}, ("stages[0].density: combine: ties trims each task's update and needs "
                                        "density (the share kept, e.g. 0.5)")),
    ({"tasks": [{"name": "a"}, TOPIC], "combine": "linear", "density": 0.5},
     "stages[0].density: combine: linear keeps every entry; remove density"),
    ({"tasks": [{"name": "a"}, TOPIC], "combine": "cat", "majority_sign": "total"},
     "stages[0].majority_sign: only ties/dare_ties elect a sign"),
    ({"tasks": [{"name": "a", "weight": 0.5}, TOPIC], "combine": "switch"},
     "stages[0].tasks: combine: switch runs each task with its own adapter"),
    ({"tasks": [{"name": "a b"}, TOPIC], "combine": "cat"}, "stages[0].tasks[0].name"),
    ({"tasks": [{"name": "a", "datta": {}}, TOPIC], "combine": "cat"},
     "stages[0].tasks[0].datta: unknown key; did you mean 'data'? (valid keys: name, data, weight)"),
    ({"tasks": [{"name": "a"}, TOPIC], "combine": "mean"}, "stages[0].combine"),
    ({"tasks": [{"name": "a"}, TOPIC], "combine": "cat", "fsdp": {}},
     "stages[0].fsdp: compose trains its task adapters one after another on one process; remove fsdp"),
])
def test_recipe_mistakes_name_the_field_and_the_fix(stage, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(stage))
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_task_data_problems_are_found_before_training(tiny_bert_dir, cls_data, topic_csv, tmp_path):
    config = Compose(tasks=[{"name": "sentiment"}, {"name": "topic", "data": _topic(topic_csv, label_column="lbl")}],
                     combine="cat")
    problems = check_compose(ModelBundle.load(tiny_bert_dir), config, _ctx(tmp_path, cls_data))
    assert len(problems) == 1 and problems[0].startswith("tasks[1].data.label_column: ")
    assert "lbl" in problems[0] and "topic" in problems[0]


def test_a_pruned_base_is_refused_before_work(tiny_bert_dir, cls_data, topic_csv, tmp_path):
    bundle = testing.prune_bert_encoder_randomly(ModelBundle.load(tiny_bert_dir), seed=0)
    problems = check_compose(bundle, Compose(tasks=_tasks(topic_csv), combine="cat"), _ctx(tmp_path, cls_data))
    assert problems == [("type: combined task updates (TIES/DARE/linear) would move the pruned weights; compose "
                        "before prune")]


def test_the_report_shows_the_task_table(ties_run):
    from types import SimpleNamespace

    from compress.report.composition import composition_rows, composition_section

    result, _ = ties_run
    header, rows = composition_rows(result.facts["composition"])
    assert header[:5] == ["task", "metric", "own adapter", "composed", "composed / own"]
    topic = next(r for r in result.facts["composition"] if r["task"] == "topic")
    assert ["topic", "accuracy", f"{100 * topic['single']:.2f}%", f"{100 * topic['composed']:.2f}%",
            f"{topic['retained']:.3f}", "1"] in rows
    report = SimpleNamespace(points=[SimpleNamespace(name="baseline", stage_info={}),
                                     SimpleNamespace(name="01-compose", stage_info=result.facts)])
    text = "\n".join(composition_section(report))
    assert text.startswith("## Composition: 01-compose") and "peft's `ties`, density 0.5" in text
    assert "| topic | accuracy | " in text and "min_retained is off" in text


@pytest.mark.slow  # a whole run with two task adapters and its eval points (~15-30 s here)
def test_a_published_compose_run_carries_every_adapter_loadable_with_plain_peft(tiny_bert_dir, sentiment_csv,
                                                                                topic_csv, tmp_path):
    """`compress push --dry-run` of a run with a compose stage: every task's own and composed adapter
    travels with the final model; compose.json names no local path; each published adapter reloads with
    plain peft into the logits of the run's own copy; the card says how."""
    from compress import run
    from compress.hub import PublishSpec, build_publish_folder

    out = tmp_path / "run"
    recipe = {"name": "compose-publish", "model": {"path": str(tiny_bert_dir)},
              "data": {"source": str(sentiment_csv), "label_column": "label", "max_length": 32, "eval_size": 0.2},
              "eval": {"speed": False, "side_by_side": False}, "output_dir": str(out),
              "stages": [{"type": "compose", "tasks": _tasks(topic_csv), "combine": "cat", "min_retained": None,
                          **FAST}]}
    run(recipe, show_progress=False)
    published = build_publish_folder(out, tmp_path / "publish", PublishSpec(), repo_id="me/composed")
    stage = published / "adapters" / "01-compose"
    index = json.loads((stage / "compose.json").read_text())
    assert index["base_model"] is None  # a local base folder is never published as a path
    assert str(tmp_path) not in (stage / "compose.json").read_text()
    for task, entry in index["tasks"].items():
        for sub in (entry["adapter"], entry["composed_adapter"]):
            base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=entry["num_labels"])
            mine = PeftModel.from_pretrained(base, stage / sub).eval()
            base2 = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=entry["num_labels"])
            theirs = PeftModel.from_pretrained(base2, out / "adapters" / "01-compose" / sub).eval()
            ids = torch.tensor([[1, 5, 9, 2]])
            with torch.no_grad():
                assert torch.equal(mine(input_ids=ids).logits, theirs(input_ids=ids).logits), (task, sub)
    card = (published / "README.md").read_text()
    assert "### Task adapters (01-compose: cat)" in card
    assert 'subfolder="adapters/01-compose/composed/sentiment"' in card and "me/composed" in card


@pytest.mark.slow  # three more compositions (~20-50 s here)
def test_a_resumed_run_reuses_the_tasks_that_finished_and_trains_the_rest(ties_run, tiny_bert_dir, cls_data,
                                                                           topic_csv, tmp_path, monkeypatch):
    """Stopped while training the second task, then resumed: the first task is not trained again, and the
    run ends with the same table as one that never stopped (ties_run: the same settings)."""
    from compress.training import entry

    real, trained, stop = entry.train_in_stage, [], [True]

    def stopped_at_topic(model, dataset, collate, config, ctx, **kw):
        trained.append(config.name)
        if config.name.endswith("[topic]") and stop:
            stop.clear()
            raise KeyboardInterrupt  # the first run is stopped here
        return real(model, dataset, collate, config, ctx, **kw)

    monkeypatch.setattr(entry, "train_in_stage", stopped_at_topic)
    config = Compose(tasks=_tasks(topic_csv), combine="ties", density=0.5, min_retained=None, **FAST)
    with pytest.raises(KeyboardInterrupt):
        run_compose(ModelBundle.load(tiny_bert_dir), config, _ctx(tmp_path, cls_data))
    trained.clear()
    resumed = run_compose(ModelBundle.load(tiny_bert_dir), config,
                          dataclasses.replace(_ctx(tmp_path, cls_data), resume=True))
    assert trained == ["compose[topic]"]  # sentiment came back from its finished state
    def table(facts):  # every figure but the wall-clock seconds
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in facts["composition"]]

    assert table(resumed.facts) == table(ties_run[0].facts)
    # Other settings make the finished state stale: everything trains again.
    trained.clear()
    other = config.model_copy(update={"rank": 2})
    run_compose(ModelBundle.load(tiny_bert_dir), other, dataclasses.replace(_ctx(tmp_path, cls_data), resume=True))
    assert trained == ["compose[sentiment]", "compose[topic]"]
