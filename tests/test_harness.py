"""lm-evaluation-harness through its Python API, offline, with a local task over local data."""

import json

import pytest
import torch

from compress import run

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("the big cats", ["run .", "fish fly"], 0),
    ("my dogs", ["sleep very good .", "the the the"], 0),
    ("the red birds", ["fly .", "cats cats"], 1),
    ("my small fish", ["eat .", "see bad"], 0),
]


@pytest.fixture
def local_task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def _hand_accuracy(model, tokenizer):
    """Multiple-choice accuracy by summed log-likelihood of each choice after the question."""
    correct = 0
    for question, choices, answer in QUESTIONS:
        scores = []
        for choice in choices:
            ctx = tokenizer(question)["input_ids"]
            full = tokenizer(question + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == answer)
    return correct / len(QUESTIONS)


def test_lm_eval_local_task_matches_hand_computation(lm_recipe, local_task):
    from compress.bundle import ModelBundle

    lm_recipe["eval"].update(speed=False, lm_eval={"tasks": ["tiny_mc"], "include_path": str(local_task),
                                                     "batch_size": 2})
    report = run(lm_recipe)
    results = report.baseline.accuracy.lm_eval
    bundle = ModelBundle.load(lm_recipe["model"]["path"])
    assert results["tiny_mc"]["acc"] == pytest.approx(_hand_accuracy(bundle.model, bundle.tokenizer))
    report_md = open(lm_recipe["output_dir"] + "/report.md").read()
    assert "## lm-evaluation-harness" in report_md and "tiny_mc/acc" in report_md


def test_unknown_task_is_named(lm_recipe, local_task):
    from compress.errors import CompressError

    lm_recipe["eval"].update(speed=False, lm_eval={"tasks": ["no_such_task"], "include_path": str(local_task)})
    with pytest.raises(CompressError, match=r"eval.lm_eval.tasks: unknown task\(s\) \['no_such_task'\]"):
        run(lm_recipe)


def test_lm_eval_on_a_classifier_is_a_recipe_error(cls_recipe):
    from compress import RecipeError, load_recipe

    cls_recipe["eval"]["lm_eval"] = {"tasks": ["x"]}
    with pytest.raises(RecipeError, match="eval.lm_eval: harness tasks need a causal LM"):
        load_recipe(cls_recipe)
