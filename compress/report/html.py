"""A self-contained HTML report: tables plus the plots embedded as data URIs (one file to share)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from compress.report.render import PLOT_TITLES, comparison_rows, goal_rows
from compress.report.schema import Report
from compress.report.sidebyside import memory_rows, setup_note, speed_rows

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.85rem}th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.pass{color:#1a7f37;font-weight:600}
.fail{color:#cf222e;font-weight:600}figure{margin:1rem 0}img{max-width:100%;border:1px solid #eee}
.meta{color:#555;font-size:.9rem}
"""


def _table(header: list[str], rows: list[list[str]], result_col: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = f' class="{cell.lower()}"' if i == result_col else ""
            cells.append(f"<td{cls}>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def render_html(report: Report, plots: dict[str, Path]) -> str:
    env = report.environment
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>compress report: {html.escape(report.name)}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>compress report: {html.escape(report.name)}</h1>",
             f"<p class='meta'>Status <b>{html.escape(report.status)}</b>"
             + (f" — {html.escape(report.error)}" if report.error else "")
             + f" · created {html.escape(report.created)} · seed {report.seed} · python {env.python} · "
               f"torch {env.versions.get('torch')} · {html.escape(env.cpu or '')} ({env.cpu_count} cores)"
             + (f" · GPU {html.escape(env.gpu)}" if env.gpu else "") + "</p>"]
    if report.points:
        parts += ["<h2>Eval points</h2><p>Ratios (×) and point differences (pt) are against the baseline.</p>",
                  _table(*comparison_rows(report))]
    if report.side_by_side is not None:
        parts += ["<h2>Side by side</h2>", f"<p>{html.escape(setup_note(report))}</p>"]
        header, rows = speed_rows(report)
        if rows:
            parts.append(_table(header, rows))
        header, rows = memory_rows(report)
        if rows:
            parts += ["<p>Memory, each model alone:</p>", _table(header, rows)]
    if report.goals:
        header, rows = goal_rows(report.goals)
        parts += ["<h2>Goals</h2>", _table(header, rows, result_col=len(header) - 1)]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [_image(path, PLOT_TITLES.get(name, name)) for name, path in plots.items()]
    stages = [p for p in report.points if p.stage_type]
    if stages:
        parts.append("<h2>Stages</h2><ul>")
        for p in stages:
            facts = ", ".join(f"{k}={v}" for k, v in p.stage_info.items() if not isinstance(v, (list, dict)))
            notes = "".join(f"<li>note: {html.escape(n)}</li>" for n in p.notes)
            parts.append(f"<li><b>{html.escape(p.name)}</b> ({p.stage_seconds} s): {html.escape(facts)}"
                         + (f"<ul>{notes}</ul>" if notes else "") + "</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
