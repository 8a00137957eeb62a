"""`compress compare RUN_DIR…`: one table and one Pareto plot across finished runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from compress.errors import CompressError, RunFolderError
from compress.io import atomic_dir, write_json_atomic, write_text_atomic
from compress.ownership import check_output, write_marker
from compress.report.plots import plot_pareto
from compress.report.render import format_number, markdown_table
from compress.report.schema import EvalPoint, Report
from compress.report.sidebyside import fmt_ratio, headline_speedup


def load_report(run_dir: str | Path) -> Report:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise CompressError(f"{run_dir}: no report.json here; give run folders written by `compress run`")
    try:
        return Report.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise RunFolderError(f"{path}: damaged or not a compress report ({exc.error_count()} problem(s), first: "
                             f"{exc.errors()[0]['msg']}); rerun `compress run --resume` on that run to rebuild it"
                             ) from None


def _faster_bn(report: Report, point: EvalPoint) -> str:
    """Batch-N speed-up over the run's baseline: the side-by-side ratio with its spread when the run
    timed its models together; otherwise the ratio of figures timed apart, marked as such."""
    base = report.baseline
    if point is base:
        return "–"
    if report.side_by_side is not None and point.timing is not None:
        return fmt_ratio(headline_speedup(point))
    lat = point.speed.latency_bn_ms if point.speed else None
    base_lat = base.speed.latency_bn_ms if base and base.speed else None
    return f"{base_lat / lat:.2f} (timed apart)" if lat and base_lat else "–"


def _latency(point: EvalPoint, attr: str) -> float | None:
    spread = getattr(point.timing, f"{attr}_ms", None) if point.timing else None
    if spread is not None:
        return spread.median
    return getattr(point.speed, f"{attr}_ms") if point.speed else None


def compare_rows(reports: list[Report]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "eval point", "disk", "× smaller", "lat b1 ms", "lat bN ms", "× faster bN", "accuracy",
              "perplexity", "status"]
    rows = []
    for report in reports:
        base = report.baseline
        for point in report.points:
            size = point.size.disk_bytes if point.size else None
            base_size = base.size.disk_bytes if base and base.size else None
            rows.append([
                report.name, point.name, format_number(size, "bytes"),
                f"{base_size / size:.2f}" if size and base_size else "–",
                format_number(_latency(point, "latency_b1"), "float"),
                format_number(_latency(point, "latency_bn"), "float"),
                _faster_bn(report, point),
                format_number(point.accuracy.accuracy if point.accuracy else None, "pct"),
                format_number(point.accuracy.perplexity if point.accuracy else None, "float"),
                report.status,
            ])
    return header, rows


def compare_runs(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Write compare.md, compare.json and compare.png into `output`; returns the folder."""
    if not run_dirs:
        raise RunFolderError("compare: give at least one run folder")
    # Checked before anything is read or written: compare replaces its output folder as a whole.
    output = check_output(output, "compare", inputs=list(run_dirs))
    reports = [load_report(d) for d in run_dirs]
    names = [r.name for r in reports]
    labels = [n if names.count(n) == 1 else f"{n} ({Path(d).name})" for n, d in zip(names, run_dirs, strict=True)]
    header, rows = compare_rows(reports)
    with atomic_dir(output) as tmp:
        write_marker(tmp, "compare")
        plot = plot_pareto({label: r.points for label, r in zip(labels, reports, strict=True)},
                           tmp / "compare.png", title="Size against accuracy, all runs")
        intro = (f"Runs: {', '.join(labels)}. Ratios are against each run's own baseline; speed-ups are from "
                 "each run's side-by-side pass (median and min–max over rounds; n.s.: the spread includes 1.0), "
                 "latencies are side-by-side medians.")
        md = ["# compress comparison", "", intro,
              "", markdown_table(header, rows), ""]
        if plot:
            md += ["![Size against accuracy](compare.png)", ""]
        write_text_atomic(tmp / "compare.md", "\n".join(md))
        write_json_atomic(tmp / "compare.json", {"runs": [str(d) for d in run_dirs], "header": header, "rows": rows})
    return output
