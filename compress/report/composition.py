"""The composition table of a report: for each compose stage, task x {own adapter, composed}."""

from __future__ import annotations

from typing import Any

from compress.report.schema import Report


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.3f}"


def composition_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one compose stage's table (its `composition` facts)."""
    header = ["task", "metric", "own adapter", "composed", "composed / own", "weight"]
    out = []
    for r in rows:
        metric = r.get("metric", "accuracy")
        retained = r.get("retained")
        out.append([r["task"], metric, _fmt(r.get("single"), metric), _fmt(r.get("composed"), metric),
                    "–" if retained is None else f"{retained:.3f}", f"{r.get('weight', 1.0):g}"])
    return header, out


def composition_section(report: Report) -> list[str]:
    """Markdown lines for every stage that reported a composition (none: no lines)."""
    from compress.report.render import markdown_table

    out: list[str] = []
    for point in report.points:
        rows = point.stage_info.get("composition")
        if not isinstance(rows, list) or not rows:
            continue
        info = point.stage_info
        how = ("switch: each task keeps its own adapter (nothing combined)" if info.get("combine") == "switch"
               else f"combined with peft's `{info.get('combine')}`"
               + (f", density {info['density']:g}" if info.get("density") is not None else ""))
        floor = info.get("min_retained")
        out += [f"## Composition: {point.name}", "",
                f"Each task evaluated on its own held-out split with its own adapter and with the composed body "
                f"(+ its own head); {how}. "
                + (f"The stage fails if a task keeps less than {floor:g} of its own score (perplexity: inverted)."
                   if floor is not None else "min_retained is off: the ratio is only reported."), "",
                markdown_table(*composition_rows(rows)), ""]
    return out
