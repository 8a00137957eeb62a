"""PNG plots drawn from report data (matplotlib, headless). Nothing is measured here."""

from __future__ import annotations

from pathlib import Path

from compress.report.schema import EvalPoint, Report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, legend: bool = True) -> Path:
    plt = _pyplot()
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality(point: EvalPoint) -> tuple[float | None, str]:
    """The accuracy figure a plot puts on its y axis: accuracy, else perplexity."""
    acc = point.accuracy
    if acc is None:
        return None, ""
    if acc.perplexity is not None and acc.macro_f1 is None:
        return acc.perplexity, "perplexity (lower is better)"
    return (100 * acc.accuracy if acc.accuracy is not None else None), "accuracy (%)"


def _size_mib(point: EvalPoint) -> float | None:
    if point.size is None or point.size.disk_bytes is None:
        return None
    return point.size.disk_bytes / 2**20


def pareto_front(points: list[tuple[float, float]], lower_y_better: bool) -> list[tuple[float, float]]:
    """Points not beaten on both size (smaller) and quality; sorted by size."""
    front, best = [], None
    # Smallest first; at equal size the best quality first, so the worse twin is dominated.
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_y_better else -p[1])):
        if best is None or (y < best if lower_y_better else y > best):
            front.append((x, y))
            best = y
    return front


def plot_pareto(series: dict[str, list[EvalPoint]], path: Path, title: str = "Size against accuracy") -> Path | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ylabel, everything = "", []
    for label, points in series.items():
        xs, ys, names = [], [], []
        for p in points:
            y, ylabel = quality(p)[0], quality(p)[1] or ylabel
            x = _size_mib(p)
            if x is not None and y is not None:
                xs.append(x), ys.append(y), names.append(p.name)
        if not xs:
            continue
        ax.scatter(xs, ys, label=label if len(series) > 1 else None, zorder=3)
        for x, y, n in zip(xs, ys, names, strict=True):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        everything += list(zip(xs, ys, strict=True))
    if not everything:
        plt.close(fig)
        return None
    front = pareto_front(everything, lower_y_better="perplexity" in ylabel)
    ax.plot([f[0] for f in front], [f[1] for f in front], "--", color="grey", zorder=2, label="Pareto front")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, ax, path)


def _bars(ax, names: list[str], spreads: list, ylabel: str, title: str) -> None:
    """Median bars with min-max whiskers (side-by-side figures)."""
    medians = [s.median for s in spreads]
    errors = [[s.median - s.min for s in spreads], [s.max - s.median for s in spreads]]
    ax.bar(range(len(medians)), medians, yerr=errors, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(medians)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(medians):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)


def _figure(panels: list[tuple[list[str], list, str, str]], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _bars(ax, *panel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_side_by_side(report: Report, path: Path) -> Path | None:
    points = [p for p in report.points if p.timing is not None and p.timing.latency_b1_ms is not None]
    if not points:
        return None
    names = [p.name for p in points]
    n = report.side_by_side.batch_size if report.side_by_side else "N"
    return _figure([(names, [p.timing.latency_b1_ms for p in points], "latency (ms)", "batch 1"),
                    (names, [p.timing.latency_bn_ms for p in points], "latency (ms)", f"batch {n}")],
                   path, "Latency, side by side (median, min–max over rounds)")


def plot_generation(report: Report, path: Path) -> Path | None:
    points = [p for p in report.points if p.timing is not None and p.timing.ttft_ms is not None]
    if not points:
        return None
    names = [p.name for p in points]
    s = report.side_by_side
    return _figure([(names, [p.timing.ttft_ms for p in points], "ms", f"time to first token ({s.prompt_tokens} tok)"),
                    (names, [p.timing.decode_b1_tps for p in points], "tokens/s", "decode, batch 1"),
                    (names, [p.timing.decode_bn_tps for p in points], "tokens/s",
                     f"decode, batch {s.generate_batch_size}")],
                   path, "Generation with the KV cache, side by side")


def plot_memory(report: Report, path: Path) -> Path | None:
    points = [p for p in report.points if p.memory is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = range(len(points))
    for offset, label, values in ((-0.27, "model resident", [p.memory.resident_bytes for p in points]),
                                  (0.0, "peak (" + points[0].memory.workload + ")", [p.memory.peak_bytes for p in points]),
                                  (0.27, "tensor bytes", [p.memory.weight_bytes or 0 for p in points])):
        ax.bar([x + offset for x in xs], [v / 2**20 for v in values], width=0.27, label=label)
    ax.set_xticks(list(xs), [p.name for p in points], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("Memory, each model alone in a fresh process")
    return _save(fig, ax, path)


def plot_latency(report: Report, path: Path) -> Path | None:
    if any(p.timing is not None and p.timing.latency_b1_ms is not None for p in report.points):
        return plot_latency_side_by_side(report, path)
    points = [p for p in report.points if p.speed is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    names = [p.name for p in points]
    for ax, attr, label in ((axes[0], "latency_b1_ms", "batch 1"),
                            (axes[1], "latency_bn_ms", f"batch {points[0].speed.batch_size}")):
        values = [getattr(p.speed, attr) for p in points]
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"Latency, {label}")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(report: Report, path: Path) -> Path | None:
    point = report.final
    if point is None or point.size is None or not point.size.layers:
        return None
    layers = point.size.layers
    plt = _pyplot()
    height = max(3.0, 0.16 * len(layers) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(9, min(height, 30)), sharey=True)
    ys = range(len(layers))
    axes[0].barh(ys, [100 * (1 - layer.nonzero / layer.parameters) for layer in layers], color="#dd8452")
    axes[0].set_xlabel("sparsity (%)")
    axes[0].set_yticks(list(ys), [layer.name for layer in layers], fontsize=6)
    axes[0].invert_yaxis()
    axes[1].barh(ys, [layer.bits_per_weight for layer in layers], color="#55a868")
    axes[1].set_xlabel("bits per weight")
    fig.suptitle(f"Per-layer sparsity and bit-width ({point.name})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(report: Report, path: Path) -> Path | None:
    curves = {p.name: p.stage_info.get("loss_curve") for p in report.points if p.stage_info.get("loss_curve")}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    return _save(fig, ax, path)


def draw_all(report: Report, folder: Path) -> dict[str, Path]:
    """Every plot the report has data for, as {name: png path}."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {
        "pareto": plot_pareto({report.name: report.points}, folder / "pareto.png"),
        "latency": plot_latency(report, folder / "latency.png"),
        "generation": plot_generation(report, folder / "generation.png"),
        "memory": plot_memory(report, folder / "memory.png"),
        "layers": plot_layers(report, folder / "layers.png"),
        "loss": plot_losses(report, folder / "loss.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
