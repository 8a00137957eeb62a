"""`compress autotune`: search a bounded space of stage settings for the smallest model within budget.

Every candidate is the base recipe with some fields overridden (`stages[1].sparsity=0.5`). All are
validated before any runs. They run in an order that varies later stages fastest, through one
shared stage cache, so candidates that share a prefix of stages reuse those outputs (and the
baseline) instead of recomputing them. The result: every candidate's figures, the Pareto front of
size against accuracy, the winning recipe and a frontier plot.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import CompressError, RecipeError
from compress.io import write_json_atomic, write_text_atomic
from compress.ownership import write_marker
from compress.report.plots import pareto_front, plot_pareto
from compress.report.render import markdown_table
from compress.report.schema import Report

log = logging.getLogger("compress")
BUDGETS = ("accuracy_drop", "perplexity_ratio")


class AutotuneSpec(BaseModel):
    """The recipe's optional `autotune:` section (the CLI's --space/--budget add to it)."""

    model_config = ConfigDict(extra="forbid")

    space: dict[str, list[Any]] = Field(default_factory=dict, description="Override path -> values to try, "
                                        "e.g. {'stages[1].sparsity': [0.3, 0.5]}.")
    budget: dict[str, float] = Field(default_factory=dict, description="accuracy_drop (absolute, vs baseline) "
                                     "and/or perplexity_ratio (final / baseline).")
    max_candidates: int = Field(32, gt=0, description="Refuse spaces larger than this.")


def parse_space(items: list[str]) -> dict[str, list[Any]]:
    """`stages[1].sparsity=0.3,0.5` -> {'stages[1].sparsity': [0.3, 0.5]} (values are YAML scalars)."""
    space = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise RecipeError(f"--space {item!r} must look like key.path=v1,v2 (e.g. stages[1].sparsity=0.3,0.5)")
        parsed = yaml.safe_load(values if values.strip().startswith("[") else f"[{values}]")
        space[key.strip()] = parsed
    return space


def parse_budget(items: list[str]) -> dict[str, float]:
    budget = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key not in BUDGETS or not sep:
            raise RecipeError(f"--budget {item!r}: use {' or '.join(b + '=VALUE' for b in BUDGETS)}")
        try:
            budget[key] = float(value)
        except ValueError:
            raise RecipeError(f"--budget {item!r}: {value!r} is not a number") from None
    return budget


def _stage_index(key: str) -> int:
    match = re.match(r"stages(?:\[|\.)(\d+)", key)
    return int(match.group(1)) if match else -1


def candidates(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    # Earlier stages vary slowest, so consecutive candidates share the longest prefix of stages.
    keys = sorted(space, key=_stage_index)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]


def _figures(report: Report) -> dict[str, Any]:
    final, base = report.final, report.baseline
    acc = final.accuracy if final else None
    return {
        "disk_bytes": final.size.disk_bytes if final and final.size else None,
        # Timed alone, minutes apart from the other candidates: kept for reference only.
        "latency_bn_ms": final.speed.latency_bn_ms if final and final.speed else None,
        # Timed side by side with the baseline in interleaved rounds: comparable across candidates,
        # because every candidate is paired with the same baseline model.
        **_side_by_side_speedup(final),
        "accuracy": acc.accuracy if acc else None,
        "perplexity": acc.perplexity if acc else None,
        "baseline_accuracy": base.accuracy.accuracy if base and base.accuracy else None,
        "baseline_perplexity": base.accuracy.perplexity if base and base.accuracy else None,
    }


def pick_winner(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest candidate within budget; among equal sizes, the larger side-by-side speed-up over
    the baseline (never the alone timings, which are minutes apart and carry the machine's load)."""
    feasible = [r for r in rows if r["feasible"]]
    return min(feasible, key=lambda r: (r["disk_bytes"], -(r.get("speedup_bn") or 0)), default=None)


def _side_by_side_speedup(final: Any) -> dict[str, Any]:
    ratio = final.timing.speedup.get("latency_bn") if final and final.timing else None
    return {"speedup_bn": ratio.median if ratio else None,
            "speedup_bn_significant": ratio.significant if ratio else None}


def within_budget(fig: dict[str, Any], budget: dict[str, float]) -> bool:
    if "accuracy_drop" in budget:
        if fig["accuracy"] is None or fig["baseline_accuracy"] is None:
            return False
        if fig["baseline_accuracy"] - fig["accuracy"] > budget["accuracy_drop"] + 1e-12:
            return False
    if "perplexity_ratio" in budget:
        if fig["perplexity"] is None or not fig["baseline_perplexity"]:
            return False
        if fig["perplexity"] / fig["baseline_perplexity"] > budget["perplexity_ratio"] + 1e-12:
            return False
    return True


def autotune(recipe_source: Any, output: str | Path, *, space: dict[str, list[Any]] | None = None,
             budget: dict[str, float] | None = None, overrides: list[str] | None = None,
             max_candidates: int | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Run the search; returns the summary that autotune.json holds."""
    from compress.recipe import load_recipe
    from compress.runner import Runner

    base = load_recipe(recipe_source, overrides)
    spec = base.autotune or AutotuneSpec()
    space = {**spec.space, **(space or {})}
    budget = {**spec.budget, **(budget or {})}
    limit = max_candidates or spec.max_candidates
    if not space:
        raise RecipeError("autotune: give a search space (--space stages[1].sparsity=0.3,0.5 or autotune.space)")
    if not budget:
        raise RecipeError("autotune: give a budget (--budget accuracy_drop=0.01 or autotune.budget)")
    combos = candidates(space)
    if len(combos) > limit:
        raise RecipeError(f"autotune: {len(combos)} candidates exceed max_candidates={limit}; narrow the space")
    output = _check_output(output, recipe_source, base)
    recipes, problems = [], []
    for i, combo in enumerate(combos):  # validate every candidate before running any
        try:
            recipes.append(load_recipe(base.to_dict(explicit_only=True), {**combo, "name": f"{base.name}-c{i:02d}",
                                                        "output_dir": str(output / "candidates" / f"c{i:02d}")}))
        except RecipeError as exc:
            problems += [f"candidate {combo}: {p}" for p in exc.problems]
    if problems:
        raise RecipeError(problems)

    output.mkdir(parents=True, exist_ok=True)
    write_marker(output, "autotune")
    started, rows = time.perf_counter(), []
    for i, (combo, recipe) in enumerate(zip(combos, recipes, strict=True)):
        log.info("autotune: candidate %d/%d %s", i + 1, len(combos), combo)
        runner = Runner(recipe, overwrite=True, show_progress=show_progress, stage_cache=output / "cache")
        try:
            report = runner.run()
        except CompressError as exc:
            rows.append({"candidate": f"c{i:02d}", "settings": combo, "error": str(exc), "feasible": False})
            continue
        fig = _figures(report)
        rows.append({"candidate": f"c{i:02d}", "settings": combo, **fig, "feasible": within_budget(fig, budget),
                     "stages_reused": runner.stage_cache.hits if runner.stage_cache else 0, "report": str(runner.out / "report.json")})
    seconds = time.perf_counter() - started

    measured = [r for r in rows if r.get("disk_bytes") is not None and r.get("accuracy") is not None]
    lower = "perplexity_ratio" in budget and "accuracy_drop" not in budget
    key = "perplexity" if lower else "accuracy"
    front = set(pareto_front([(r["disk_bytes"], r[key]) for r in measured if r[key] is not None], lower))
    for r in measured:
        r["pareto"] = (r["disk_bytes"], r[key]) in front
    winner = pick_winner(measured)
    summary = {"candidates": len(combos), "seconds": round(seconds, 1), "budget": budget, "space": space,
               "stages_reused": sum(r.get("stages_reused", 0) for r in rows), "winner": winner, "rows": rows}
    _write_outputs(output, base, summary, recipes, winner)
    return summary


def _check_output(output: str | Path, recipe_source: Any, base: Any) -> Path:
    """The search writes candidates, a cache and results into `output`: refuse a folder compress did
    not create, one inside a run, and one that is or holds an input (recipe, model, data)."""
    from compress.ownership import check_output

    inputs = [p for p in (recipe_source, base.model.path, base.data.source)
              if isinstance(p, (str, Path)) and not str(p).startswith("pkg:") and Path(p).exists()]
    return check_output(output, "autotune", inputs=inputs)


def _write_outputs(output: Path, base: Any, summary: dict[str, Any], recipes: list[Any], winner: Any) -> None:
    from compress.report.schema import EvalPoint

    write_json_atomic(output / "autotune.json", summary)
    if winner is not None:
        chosen = recipes[int(winner["candidate"][1:])].to_dict(explicit_only=True)
        chosen.pop("output_dir", None)
        chosen.pop("autotune", None)
        chosen["name"] = f"{base.name}-tuned"
        write_text_atomic(output / "winner.yaml", f"# compress run {output / 'winner.yaml'}\n"
                          + yaml.safe_dump(chosen, sort_keys=False))
    series: dict[str, list[EvalPoint]] = {"within budget": [], "over budget": []}
    for r in summary["rows"]:
        if r.get("report"):
            point = Report.model_validate_json(Path(r["report"]).read_text()).final
            point.name = r["candidate"]
            series["within budget" if r["feasible"] else "over budget"].append(point)
    plot_pareto({k: v for k, v in series.items() if v}, output / "frontier.png", title="Autotune frontier")
    header = ["candidate", "settings", "disk MiB", "speed-up bN (side by side)", "accuracy", "perplexity",
              "within budget", "Pareto"]
    rows = [[r["candidate"], ", ".join(f"{k}={v}" for k, v in r["settings"].items()),
             f"{r['disk_bytes'] / 2**20:.2f}" if r.get("disk_bytes") else "–",
             _speedup_cell(r),
             f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "–",
             f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "–",
             "yes" if r["feasible"] else ("error: " + r["error"][:60] if r.get("error") else "no"),
             "yes" if r.get("pareto") else ""] for r in summary["rows"]]
    md_note = ("Speed-up: each candidate's final model against the baseline, timed side by side in "
               "interleaved rounds within its own run (median of rounds; n.s. = the spread includes 1.0).")
    win = (f"Winner: **{winner['candidate']}** ({', '.join(f'{k}={v}' for k, v in winner['settings'].items())}) "
           f"→ `winner.yaml`." if winner else "No candidate met the budget.")
    md = [f"# compress autotune: {base.name}", "",
          f"{summary['candidates']} candidates in {summary['seconds']} s; {summary['stages_reused']} stage outputs "
          f"reused from shared prefixes. Budget: {summary['budget']}.", "", win, "",
          markdown_table(header, rows), "", md_note, "",
          "![Autotune frontier](frontier.png)", ""]
    write_text_atomic(output / "autotune.md", "\n".join(md))


def _speedup_cell(row: dict[str, Any]) -> str:
    if row.get("speedup_bn") is None:
        return "–"
    return f"{row['speedup_bn']:.2f}×" + ("" if row.get("speedup_bn_significant") else " (n.s.)")
