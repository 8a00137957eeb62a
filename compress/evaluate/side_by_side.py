"""The side-by-side pass: every eval point's model timed together, and its memory measured alone.

Run once after the last stage (`measure_side_by_side`). Speed ratios between eval points timed
minutes apart are machine noise on any shared machine; here the models run in interleaved rounds
(A B C A B C ...) in one process, each ratio is taken within a round, and its spread over rounds
is stored, so a ratio whose spread includes 1.0 is marked not significant. Models too big to hold
together are timed in alternating fresh processes instead (mode "processes"), which the report says.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.evaluate.isolated import run_isolated
from compress.evaluate.timing import (
    MeasurementStopped,
    busy_cores,
    forward_call,
    model_vocab,
    random_ids,
    round_ratios,
    significant,
    spread,
    threads_for_free_cores,
    time_generation,
    time_interleaved,
    torch_threads,
)
from compress.recipe import EvalSpec, Recipe
from compress.registry import base_load_plan
from compress.report.schema import MemoryMetrics, Ratio, Report, SideBySide, SideBySideTiming, Spread

log = logging.getLogger("compress")

# figure -> higher is better (tokens/s) or lower is better (times)
FIGURES = {"latency_b1": False, "latency_bn": False, "ttft": False, "decode_b1": True, "decode_bn": True}
# Models together may take this share of the memory that is free before the pass (auto mode).
FIT_SHARE = 0.5
# Each round keeps a model's fastest forward of its repeats: the ratios are what users quote, and
# contention from other jobs only adds time (see timing.time_interleaved).
ROUND_KEEP = "min"


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _sources(report: Report, recipe: Recipe, out: Path, task: str, data: Any) -> dict[str, dict[str, Any]]:
    """Where each eval point's model comes from: the base model (rebuilt) or its stage folder."""
    sources: dict[str, dict[str, Any]] = {}
    for point in report.points:
        if point.name == "baseline":
            sources[point.name] = {"base": recipe.model.model_dump(mode="json"), "task": task, "seed": recipe.seed,
                                   "nf4": base_load_plan(recipe.stages),  # as the baseline was measured
                                   "label_names": getattr(data, "label_names", None)}
        elif (out / point.name).is_dir():
            sources[point.name] = {"folder": str(out / point.name)}
    return sources


def fits_together(report: Report, names: list[str], device: str) -> bool:
    """Whether the named points' models (their in-memory bytes) fit in FIT_SHARE of the free memory."""
    need = sum((p.size.memory_bytes or 0) if p.size else 0 for p in report.points if p.name in names)
    if device.startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return need <= FIT_SHARE * free


def _spread(values: list[float], scale: float = 1.0) -> Spread:
    low, mid, high = spread([v * scale for v in values])
    return Spread(min=round(low, 4), median=round(mid, 4), max=round(high, 4))


def _ratio(base: list[float], other: list[float], higher_is_better: bool) -> Ratio:
    ratios = round_ratios(base, other, higher_is_better)
    low, mid, high = spread(ratios)
    return Ratio(min=round(low, 4), median=round(mid, 4), max=round(high, 4), significant=significant(ratios))


def _load(source: dict[str, Any], device: str) -> Any:
    from types import SimpleNamespace

    from compress.bundle import ModelBundle
    from compress.loading import load_base_model
    from compress.recipe import ModelSpec

    if "folder" in source:
        bundle = ModelBundle.load(source["folder"], device=device)
    else:
        data = SimpleNamespace(label_names=source.get("label_names"))
        bundle = load_base_model(ModelSpec(**source["base"]), source["task"], data, device, source["seed"],
                                 nf4=source.get("nf4"))
    bundle.model.eval()
    return bundle


def _time_in_process(sources: dict[str, dict[str, Any]], spec: EvalSpec, device: str, seed: int, stop: Any,
                     generate: bool, threads: int | None) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Per model, per figure: one value per round, all models timed in one process."""
    bundles = {name: _load(src, device) for name, src in sources.items()}
    try:
        vocab = min(model_vocab(b.model, b.tokenizer) for b in bundles.values())  # ids valid for every model
        rounds: dict[str, dict[str, list[float]]] = {name: {} for name in bundles}
        with torch_threads(threads) as used:
            for figure, batch in (("latency_b1", 1), ("latency_bn", spec.batch_size)):
                ids = random_ids(vocab, batch, spec.seq_len, seed).to(device)
                calls = [forward_call(b.model, ids) for b in bundles.values()]
                times = time_interleaved(calls, warmup=spec.warmup, rounds=spec.rounds, repeats=spec.repeats,
                                         device=device, stop=stop, keep=ROUND_KEEP)
                for name, t in zip(bundles, times, strict=True):
                    rounds[name][figure] = t
            if generate:
                pads = [b.tokenizer.pad_token_id for b in bundles.values()]
                for key, batch in (("b1", 1), ("bn", spec.generate_batch_size)):
                    ids = random_ids(vocab, batch, spec.prompt_tokens, seed).to(device)
                    gen = time_generation([b.model for b in bundles.values()], ids, spec.new_tokens, pads,
                                          warmup=1, rounds=spec.rounds, device=device, stop=stop)
                    for name, res in zip(bundles, gen, strict=True):
                        rounds[name][f"decode_{key}"] = res["decode_tps"]
                        if batch == 1:
                            rounds[name]["ttft"] = res["ttft_s"]
    finally:
        bundles.clear()
        gc.collect()
    return rounds, used


def _time_in_processes(sources: dict[str, dict[str, Any]], spec: EvalSpec, device: str, stop: Any,
                       generate: bool, threads: int | None) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Alternating fresh processes (A B C A B C ...), one model each: one value per process."""
    timing = {"batch": spec.batch_size, "seq_len": spec.seq_len, "warmup": spec.warmup, "repeats": spec.repeats,
              "keep": ROUND_KEEP,
              "generate": {"batch": spec.generate_batch_size, "prompt": spec.prompt_tokens,
                           "new": spec.new_tokens} if generate else None}
    names = list(sources)
    jobs = [{"source": sources[n], "device": device, "threads": threads, "timing": timing}
            for _ in range(spec.rounds) for n in names]
    results = run_isolated(jobs, stop=stop)
    rounds: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    used = 0
    keys = {"latency_b1_s": "latency_b1", "latency_bn_s": "latency_bn", "ttft_s": "ttft",
            "decode_b1_tps": "decode_b1", "decode_bn_tps": "decode_bn"}
    for i, res in enumerate(results):
        name = names[i % len(names)]
        if "error" in res:
            raise CompressError(f"side-by-side timing of {name} failed: {res['error']}")
        used = res["ok"]["threads"]
        for key, figure in keys.items():
            if key in res["ok"]["timing"]:
                rounds[name].setdefault(figure, []).append(res["ok"]["timing"][key])
    return rounds, used


def _memory(sources: dict[str, dict[str, Any]], spec: EvalSpec, device: str, stop: Any,
            generate: bool) -> dict[str, MemoryMetrics]:
    workload = ({"kind": "generate", "batch": spec.generate_batch_size, "prompt": spec.prompt_tokens,
                 "new": spec.new_tokens} if generate
                else {"kind": "forward", "batch": spec.batch_size, "seq_len": spec.seq_len})
    jobs = [{"source": src, "device": device, "threads": spec.threads, "memory": workload}
            for src in sources.values()]
    out = {}
    for name, res in zip(sources, run_isolated(jobs, stop=stop), strict=True):
        if "error" in res:
            raise CompressError(f"memory measurement of {name} failed: {res['error']}")
        out[name] = MemoryMetrics(**res["ok"]["memory"])
    return out


STOPPED_NOTE = ("The side-by-side timing pass was stopped on request (Ctrl-C or SIGTERM) before it ended: "
                "this report has no side-by-side figures, only the timings taken at each eval point.")


def measure_side_by_side(report: Report, recipe: Recipe, out: Path, task: str, data: Any, device: str,
                         stop: threading.Event | None = None) -> None:
    """Time every eval point's model side by side and measure each one's memory alone; store both in
    `report` (point.timing, point.memory, report.side_by_side). Does nothing when eval.side_by_side
    or eval.speed is off, or no eval point has a model to load.

    A set `stop` (the first Ctrl-C) ends the pass at the next round: the stages are all done, so the
    run still completes, without side-by-side figures and with a note on the final point saying why."""
    try:
        _measure(report, recipe, out, task, data, device, stop)
    except MeasurementStopped:
        for point in report.points:
            point.timing = point.memory = None
        report.side_by_side = None
        if report.final is not None:
            report.final.notes = [*report.final.notes, STOPPED_NOTE]
        log.warning("side-by-side timing stopped on request; the report keeps the per-point timings")


def _measure(report: Report, recipe: Recipe, out: Path, task: str, data: Any, device: str,
             stop: threading.Event | None) -> None:
    spec = recipe.eval
    if not spec.side_by_side or not spec.speed:  # eval.speed covers timing and memory alike
        return
    sources = _sources(report, recipe, Path(out), task, data)
    if not sources:
        return
    generate = spec.generation and task == "causal-lm"
    started, load_before = time.perf_counter(), _load_avg()
    setup = SideBySide(mode="interleaved", device=device, threads=0, rounds=spec.rounds, repeats=spec.repeats,
                       warmup=spec.warmup, batch_size=spec.batch_size, seq_len=spec.seq_len)
    if generate:
        setup.prompt_tokens, setup.new_tokens = spec.prompt_tokens, spec.new_tokens
        setup.generate_batch_size = spec.generate_batch_size
    mode = spec.side_by_side_mode
    if mode == "auto":
        mode = "interleaved" if fits_together(report, list(sources), device) else "processes"
    setup.mode = mode
    threads = spec.threads
    if threads is None and device == "cpu":  # an explicit eval.threads is kept as set
        threads, why = threads_for_free_cores(busy_cores())
        if why:
            setup.notes.append(why)
    log.info("timing %d model(s) side by side (%s, %d rounds)", len(sources), mode, spec.rounds)
    if mode == "interleaved":
        rounds, setup.threads = _time_in_process(sources, spec, device, recipe.seed, stop, generate, threads)
    else:
        rounds, setup.threads = _time_in_processes(sources, spec, device, stop, generate, threads)
        setup.notes.append("Models timed in alternating fresh processes (A B C A B C ...), one model per "
                           "process: they would not fit in memory together. Each round's value is one "
                           f"process's fastest of {spec.repeats} calls after {spec.warmup} warm-up calls.")
    base = rounds.get("baseline")
    for point in report.points:
        figures = rounds.get(point.name)
        if not figures:
            continue
        timing = SideBySideTiming(
            latency_b1_ms=_spread(figures["latency_b1"], 1000), latency_bn_ms=_spread(figures["latency_bn"], 1000))
        if "ttft" in figures:
            timing.ttft_ms = _spread(figures["ttft"], 1000)
            timing.decode_b1_tps = _spread(figures["decode_b1"])
            timing.decode_bn_tps = _spread(figures["decode_bn"])
        if base is not None and point.name != "baseline":
            timing.speedup = {f: _ratio(base[f], figures[f], higher) for f, higher in FIGURES.items()
                              if f in figures and f in base}
        point.timing = timing
    if spec.memory:
        log.info("measuring memory of %d model(s), each alone in a fresh process", len(sources))
        for name, metrics in _memory(sources, spec, device, stop, generate).items():
            point = report.point(name)
            if point is not None:
                point.memory = metrics
        setup.memory_isolation = ("allocator statistics, one fresh process per model" if device.startswith("cuda")
                                  else "resident set size, one fresh process per model")
    setup.load_average = [v for v in (load_before, _load_avg()) if v is not None] or None
    setup.seconds = round(time.perf_counter() - started, 1)
    report.side_by_side = setup
