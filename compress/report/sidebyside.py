"""Formatting of the side-by-side figures (speed ratios with their spread, memory). Nothing is measured here."""

from __future__ import annotations

from compress.report.schema import EvalPoint, Ratio, Report, Spread

# (label, spread getter, speed-up key, unit)
_SPEED = [
    ("lat b1 ms", lambda p: p.timing.latency_b1_ms, "latency_b1"),
    ("lat bN ms", lambda p: p.timing.latency_bn_ms, "latency_bn"),
    ("TTFT ms", lambda p: p.timing.ttft_ms, "ttft"),
    ("decode tok/s b1", lambda p: p.timing.decode_b1_tps, "decode_b1"),
    ("decode tok/s bN", lambda p: p.timing.decode_bn_tps, "decode_bn"),
]


def fmt_ratio(ratio: Ratio | None) -> str:
    """'1.84× (1.70–1.95)', with ', n.s.' when the spread includes 1.0 (not significant)."""
    if ratio is None:
        return "–"
    return (f"{ratio.median:.2f}× ({ratio.min:.2f}–{ratio.max:.2f}"
            + ("" if ratio.significant else ", n.s.") + ")")


def _fmt_spread(value: Spread | None) -> str:
    if value is None:
        return "–"
    return f"{value.median:.4g} ({value.min:.4g}–{value.max:.4g})"


def _mib(n: int | None) -> str:
    return "–" if n is None else (f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n / 1024:.1f} KiB")


def speed_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side speed table: median (min–max) and speed-up per figure."""
    timed = [p for p in report.points if p.timing is not None]
    used = [c for c in _SPEED if any(c[1](p) is not None for p in timed)]
    header = ["eval point"]
    for label, _get, _key in used:
        header += [label, "speed-up"]
    rows = []
    for p in timed:
        row = [p.name]
        for _label, get, key in used:
            row += [_fmt_spread(get(p)), "–" if p.name == "baseline" else fmt_ratio(p.timing.speedup.get(key))]
        rows.append(row)
    return header, rows


def memory_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the isolated memory table, with ratios to the baseline."""
    measured = [p for p in report.points if p.memory is not None]
    base = report.baseline.memory if report.baseline else None
    header = ["eval point", "model resident", "× baseline", "peak", "× baseline", "tensor bytes", "× baseline",
              "workload"]
    rows = []
    for p in measured:
        m = p.memory

        def times(value: int | None, ref: int | None) -> str:
            return f"{value / ref:.2f}" if value is not None and ref else "–"

        rows.append([p.name, _mib(m.resident_bytes), times(m.resident_bytes, base and base.resident_bytes),
                     _mib(m.peak_bytes), times(m.peak_bytes, base and base.peak_bytes),
                     _mib(m.weight_bytes), times(m.weight_bytes, base and base.weight_bytes), m.workload])
    return header, rows


def setup_note(report: Report) -> str:
    """One paragraph saying how the side-by-side figures were taken."""
    s = report.side_by_side
    if s is None:
        return ""
    parts = []
    if s.mode in ("interleaved", "processes"):
        how = ("in one process, in interleaved rounds (A B C A B C …)" if s.mode == "interleaved"
               else "in alternating fresh processes (A B C A B C …), one model per process")
        parts.append(f"Timed side by side {how} after the last stage: {s.rounds} rounds, each model run "
                     f"{s.repeats} times per round (the round keeps the fastest, since contention only adds time) for forward passes after "
                     f"{s.warmup} warm-up runs; {s.device}, {s.threads} threads; forward inputs "
                     f"{s.seq_len} tokens, batch N = {s.batch_size}.")
        if s.prompt_tokens:
            parts.append(f"Generation: prompt of {s.prompt_tokens} tokens, {s.new_tokens} new tokens with the KV "
                         f"cache (greedy), batch 1 and batch N = {s.generate_batch_size}; TTFT is prefill plus "
                         "the first token; decode tok/s excludes prefill.")
        parts.append("Figures are median (min–max) over rounds. A speed-up is the baseline's time over the "
                     "model's (tokens/s: the model's over the baseline's) within each round; n.s. marks a spread "
                     "that includes 1.0 — not significant.")
    if s.load_average:
        parts.append("Machine load average (1 min) before/after: " + " / ".join(f"{v:g}" for v in s.load_average)
                     + ".")
    if s.memory_isolation:
        parts.append(f"Memory: {s.memory_isolation} (after a throw-away load, so library set-up is not counted); "
                     "resident is what the model holds once it has run, peak the highest level during the "
                     "workload, both above the pre-load level.")
    parts += s.notes
    return " ".join(parts)


def headline_speedup(point: EvalPoint) -> Ratio | None:
    """The batch-N latency speed-up of a point (compare's column), if timed side by side."""
    return point.timing.speedup.get("latency_bn") if point.timing else None
