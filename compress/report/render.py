"""Render a Report to report.json and report.md. Formatting only: nothing is measured here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.io import atomic_dir, write_json_atomic, write_text_atomic
from compress.report.schema import EvalPoint, GoalResult, Report
from compress.report.sidebyside import memory_rows, setup_note, speed_rows

PLOTS_DIR = "plots"
PLOT_TITLES = {"pareto": "Size against accuracy", "latency": "Latency", "generation": "Generation speed",
               "memory": "Memory per model", "layers": "Per-layer sparsity and bit-width", "loss": "Training loss"}

# (label, getter, format, lower_is_better)
_COLUMNS: list[tuple[str, Any, str, bool | None]] = [
    ("params", lambda p: p.size and p.size.parameters, "count", True),
    ("sparsity", lambda p: p.size and p.size.sparsity, "pct", None),
    ("disk", lambda p: p.size and p.size.disk_bytes, "bytes", True),
    ("bits/w", lambda p: p.size and p.size.bits_per_weight, "float", True),
    ("lat b1 ms", lambda p: p.speed and p.speed.latency_b1_ms, "float", True),
    ("lat bN ms", lambda p: p.speed and p.speed.latency_bn_ms, "float", True),
    ("seq/s", lambda p: p.speed and p.speed.throughput_per_s, "float", False),
    ("accuracy", lambda p: p.accuracy and p.accuracy.accuracy, "pct", False),
    ("macro-F1", lambda p: p.accuracy and p.accuracy.macro_f1, "pct", False),
    ("perplexity", lambda p: p.accuracy and p.accuracy.perplexity, "float", True),
    ("agreement", lambda p: p.accuracy and p.accuracy.agreement, "pct", False),
]


_SPEED_LABELS = {"lat b1 ms", "lat bN ms", "seq/s"}


def format_number(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "count":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else str(value)
    if kind == "bytes":
        return f"{value / 2**20:.1f} MiB" if value >= 2**17 else f"{value / 1024:.1f} KiB"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _ratio(value: Any, base: Any) -> str:
    if value is None or base in (None, 0) or not isinstance(value, (int, float)):
        return ""
    return f" ({value / base:.2f}×)"


def _delta_points(value: Any, base: Any) -> str:
    if value is None or base is None:
        return ""
    return f" ({100 * (value - base):+.2f} pt)"


def comparison_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every eval point with absolute values and, against the baseline, ratios."""
    base = report.baseline
    used = [c for c in _COLUMNS if any(c[1](p) is not None for p in report.points)]
    # With a side-by-side pass, the timings taken at each point stay, labelled, without ratios: the
    # ratios worth quoting are the side-by-side ones.
    alone = report.side_by_side is not None and report.side_by_side.mode in ("interleaved", "processes")
    header = ["eval point"] + [f"{c[0]} (alone)" if alone and c[0] in _SPEED_LABELS else c[0] for c in used]
    rows = []
    for point in report.points:
        row = [point.name]
        for label, get, kind, _lower in used:
            value = get(point)
            cell = format_number(value, kind)
            if base is not None and point is not base and not (alone and label in _SPEED_LABELS):
                ref = get(base)
                cell += _delta_points(value, ref) if kind == "pct" else _ratio(value, ref)
            row.append(cell)
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (shared by the report, compare and autotune)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _speed_note(point: EvalPoint | None, side_by_side: bool = False) -> str:
    if point is None or point.speed is None:
        return ""
    s = point.speed
    label = ("Speed (alone): each point timed on its own when it was reached during the run, minutes apart "
             "from the others; see Side by side for ratios. " if side_by_side else "Speed: ")
    return (f"{label}{s.device}, {s.threads} threads, sequence length {s.seq_len}, batch N = {s.batch_size}; "
            f"median of {s.repeats} runs after {s.warmup} warm-up runs. Peak memory is {s.peak_memory_kind}.")


def goal_rows(goals: list[GoalResult]) -> tuple[list[str], list[list[str]]]:
    header = ["goal", "rule", "target", "actual", "baseline → final", "result"]
    rows = []
    for g in goals:
        actual = f"{g.actual:.4g}" if g.actual is not None else (g.detail or "–")
        values = (f"{g.baseline:.4g} → {g.final:.4g}" if g.baseline is not None and g.final is not None
                  else (f"{g.final:.4g}" if g.final is not None else "–"))
        rows.append([g.metric, g.rule, f"{g.target:g}", actual, values, "PASS" if g.passed else "FAIL"])
    return header, rows


def render_markdown(report: Report, plots: dict[str, str] | None = None) -> str:
    env = report.environment
    out = [f"# compress report: {report.name}", ""]
    out.append(f"Status: **{report.status}**" + (f" in stage {report.failed_stage}" if report.failed_stage else "")
               + (f" — {report.error}" if report.error else ""))
    out.append("")
    out.append(f"Created {report.created}; seed {report.seed}; python {env.python}, torch "
               f"{env.versions.get('torch')}, transformers {env.versions.get('transformers')}; "
               f"{env.cpu or 'unknown CPU'} ({env.cpu_count} cores)" + (f", GPU {env.gpu}" if env.gpu else "") + ".")
    out.append("")
    if report.points:
        header, rows = comparison_rows(report)
        out += ["## Eval points", "", "Ratios (×) and point differences (pt) are against the baseline.", "",
                markdown_table(header, rows), ""]
        note = _speed_note(report.final, report.side_by_side is not None)
        if note:
            out += [note, ""]
    if report.side_by_side is not None:
        out += ["## Side by side", "", setup_note(report), ""]
        header, rows = speed_rows(report)
        if rows:
            out += [markdown_table(header, rows), ""]
        header, rows = memory_rows(report)
        if rows:
            out += ["Memory, each model alone:", "", markdown_table(header, rows), ""]
    harness = [(p.name, p.accuracy.lm_eval) for p in report.points if p.accuracy and p.accuracy.lm_eval]
    if harness:
        keys = sorted({f"{task}/{metric}" for _, res in harness for task, ms in res.items() for metric in ms})
        rows = [[name] + [format_number(res.get(k.split("/")[0], {}).get(k.split("/")[1]), "float") for k in keys]
                for name, res in harness]
        out += ["## lm-evaluation-harness", "", markdown_table(["eval point", *keys], rows), ""]
    if report.goals:
        passed = sum(g.passed for g in report.goals)
        out += ["## Goals", "", f"{passed} of {len(report.goals)} passed (final model against the baseline).", "",
                markdown_table(*goal_rows(report.goals)), ""]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{PLOT_TITLES.get(name, name)}]({rel})" for name, rel in plots.items()]
        out.append("")
    from compress.report.composition import composition_section  # it uses markdown_table from here

    out += composition_section(report)
    stages = [p for p in report.points if p.stage_type]
    if stages:
        out += ["## Stages", ""]
        for p in stages:
            info = {k: v for k, v in p.stage_info.items() if not isinstance(v, (list, dict))}
            facts = ", ".join(f"{k}={v}" for k, v in info.items())
            out.append(f"- **{p.name}** ({p.stage_seconds} s): {facts}")
            blocks = p.stage_info.get("block_sparsity")
            if isinstance(blocks, dict) and blocks:  # OWL's layer-wise allocation, block by block
                out.append("  - sparsity per block (owl): " + ", ".join(
                    f"{name.rsplit('.', 1)[-1]}: {100 * value:.1f}%" for name, value in blocks.items()))
            widths = p.stage_info.get("mixed_assignment")
            if isinstance(widths, dict) and widths:  # mixed precision: each layer's width and sensitivity
                out.append("  - bits per layer (mixed; its sensitivity at that width): " + ", ".join(
                    f"{name}: {'float' if a.get('bits') is None else a.get('bits')} "
                    f"({a.get('sensitivity'):.3g})" for name, a in widths.items()))
            for note in p.notes:
                out.append(f"  - note: {note}")
        out.append("")
    stages_cfg = report.recipe.get("stages", [])
    out += ["## Recipe", "", f"Model `{report.recipe.get('model', {}).get('path')}`, data "
            f"`{report.recipe.get('data', {}).get('source')}`, {len(stages_cfg)} stage(s): "
            + (", ".join(s.get("type", "?") for s in stages_cfg) or "none") + ".", ""]
    return "\n".join(out)


def write_report(report: Report, folder: str | Path, plots: bool = True) -> None:
    """report.json, report.md, report.html and plots/*.png, each written atomically."""
    from compress.report.html import render_html
    from compress.report.plots import draw_all

    folder = Path(folder)
    write_json_atomic(folder / "report.json", report.model_dump(mode="json"))
    made: dict[str, Path] = {}
    if plots:
        with atomic_dir(folder / PLOTS_DIR) as tmp:
            made = {name: folder / PLOTS_DIR / path.name for name, path in draw_all(report, tmp).items()}
    rel = {name: f"{PLOTS_DIR}/{path.name}" for name, path in made.items()}
    write_text_atomic(folder / "report.md", render_markdown(report, rel))
    write_text_atomic(folder / "report.html", render_html(report, made))
