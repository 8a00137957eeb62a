"""Measurement: interleaved timing, ratio spreads, the side-by-side pass, generation speed, isolated memory."""

import json
from pathlib import Path

import pytest

from compress import RecipeError, load_recipe, run
from compress.evaluate import timing
from compress.goals import Goal, evaluate_goals
from compress.report.compare import compare_rows
from compress.report.render import render_markdown
from compress.report.schema import (
    Environment,
    EvalPoint,
    MemoryMetrics,
    Ratio,
    Report,
    SideBySide,
    SideBySideTiming,
    SpeedMetrics,
    Spread,
)

QUANT = {"type": "quantize", "scheme": "int8-dynamic"}


def test_interleaved_rounds_run_models_in_turn():
    order = []
    calls = [lambda n=n: order.append(n) for n in "ABC"]
    out = timing.time_interleaved(calls, warmup=1, rounds=2, repeats=2)
    # warm-up A B C, then each round: every model `repeats` times, in turn
    assert "".join(order) == "ABC" + "AABBCC" * 2
    assert [len(t) for t in out] == [2, 2, 2] and all(v >= 0 for t in out for v in t)


def test_a_round_keeps_the_median_or_the_fastest_of_its_repeats(monkeypatch):
    durations = iter([3.0, 1.0, 2.0, 5.0, 4.0, 9.0] * 2)  # A's three repeats, then B's
    monkeypatch.setattr(timing, "_timed", lambda call, device: next(durations))
    calls = [lambda: None, lambda: None]
    assert timing.time_interleaved(calls, warmup=0, rounds=1, repeats=3) == [[2.0], [5.0]]
    assert timing.time_interleaved(calls, warmup=0, rounds=1, repeats=3, keep="min") == [[1.0], [4.0]]


def test_timing_threads_fit_the_cores_other_work_leaves_free(monkeypatch):
    import os

    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert timing.threads_for_free_cores(0.3) == (None, None)  # a quiet machine: torch's default
    threads, why = timing.threads_for_free_cores(1.8)  # two cores taken by other work
    assert threads == 2 and why.startswith("Timed at 2 thread(s), not 4: 1.8 of the cores were busy")
    assert timing.threads_for_free_cores(9.0)[0] == 1  # never fewer than one
    assert timing.threads_for_free_cores(None) == (None, None)  # no /proc/stat: nothing to go by
    busy = timing.busy_cores(0.2)
    assert busy is None or 0.0 <= busy <= os.cpu_count() + 0.01


def test_side_by_side_times_at_the_free_cores_and_says_so(lm_recipe, monkeypatch):
    from compress.evaluate import side_by_side

    monkeypatch.setattr(side_by_side, "busy_cores", lambda: 1.0)  # a busy-looping process beside the run
    monkeypatch.setattr(side_by_side, "threads_for_free_cores",
                        lambda busy: (1, f"Timed at 1 thread(s), not 2: {busy:.1f} of the cores were busy"))
    lm_recipe["stages"] = [QUANT]
    lm_recipe["eval"].update(side_by_side=True, generation=False)
    report = run(lm_recipe, show_progress=False)
    assert report.side_by_side.threads == 1
    assert "Timed at 1 thread(s), not 2: 1.0 of the cores were busy" in report.side_by_side.notes
    lm_recipe["eval"]["threads"] = 2  # an explicit eval.threads is kept
    lm_recipe["output_dir"] += "-explicit"
    assert run(lm_recipe, show_progress=False).side_by_side.threads == 2


def test_ratio_spread_that_includes_one_is_not_significant():
    base, same, twice = [1.0, 1.0, 1.0], [0.9, 1.05, 1.1], [0.5, 0.45, 0.55]
    assert not timing.significant(timing.round_ratios(base, same))
    ratios = timing.round_ratios(base, twice)
    assert timing.significant(ratios) and timing.spread(ratios)[1] == pytest.approx(2.0)
    # rates: more is faster, so the ratio is other / base
    assert timing.round_ratios([10.0], [25.0], higher_is_better=True) == [2.5]
    assert timing.significant([0.5, 0.8])  # significantly slower is significant too


def test_bench_uses_the_product_timing(monkeypatch, tiny_llama_dir):
    from bench.common import interleaved_latency
    from compress.bundle import ModelBundle

    seen = {}
    real = timing.time_interleaved

    def spy(calls, **kwargs):
        seen.update(kwargs, n=len(calls))
        return real(calls, **kwargs)

    monkeypatch.setattr(timing, "time_interleaved", spy)
    model = ModelBundle.load(tiny_llama_dir).model
    out = interleaved_latency([model, model], batch=2, seq_len=8, warmup=1, repeats=3)
    assert seen == {"warmup": 1, "rounds": 3, "repeats": 1, "n": 2} and [len(t) for t in out] == [3, 3]


def test_generation_timing_counts_prefill_apart(tiny_llama_dir):
    from compress.bundle import ModelBundle

    bundle = ModelBundle.load(tiny_llama_dir)
    ids = timing.random_ids(bundle.model.config.vocab_size, 2, 8)
    generated = timing.generate_call(bundle.model, ids, 5, bundle.tokenizer.pad_token_id)()
    assert generated.shape == (2, 8 + 5)  # exactly G new tokens, no early stop
    res = timing.time_generation([bundle.model], ids, 5, [bundle.tokenizer.pad_token_id], warmup=0, rounds=2)[0]
    assert len(res["ttft_s"]) == 2 and all(t > 0 for t in res["ttft_s"]) and all(r > 0 for r in res["decode_tps"])


def test_a_stop_request_ends_interleaved_timing_at_the_next_round():
    import threading

    stop, order = threading.Event(), []

    def call_b():
        order.append("B")
        stop.set()  # Ctrl-C arrives during the first round

    with pytest.raises(timing.MeasurementStopped):
        timing.time_interleaved([lambda: order.append("A"), call_b], warmup=0, rounds=5, stop=stop)
    assert "".join(order) == "AB"  # the round in progress finished; no further round started


def test_a_stop_request_ends_the_isolated_worker(tmp_path):
    import threading
    import time

    from compress.evaluate.isolated import run_isolated

    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    job = {"path": str(tmp_path / "missing"), "device": "cpu", "threads": 1, "memory": None, "timing": None}
    with pytest.raises(timing.MeasurementStopped):
        run_isolated([job] * 50, stop=stop)
    assert time.monotonic() - started < 30  # ended here, not after the worker's 50 jobs


def test_ctrl_c_during_the_side_by_side_pass_completes_the_run_without_its_figures(lm_recipe, monkeypatch):
    import threading

    from compress.evaluate import side_by_side
    from compress.runner import Runner

    lm_recipe["stages"] = [QUANT]
    lm_recipe["eval"]["side_by_side"] = True
    stop = threading.Event()
    real = side_by_side.time_interleaved

    def first_ctrl_c(*args, **kwargs):
        stop.set()  # the handler's first Ctrl-C: set while the pass is timing
        return real(*args, **kwargs)

    monkeypatch.setattr(side_by_side, "time_interleaved", first_ctrl_c)
    report = Runner(load_recipe(lm_recipe), show_progress=False, stop=stop).run()
    assert report.status == "complete" and report.side_by_side is None
    assert all(p.timing is None for p in report.points) and report.final.speed is not None
    assert side_by_side.STOPPED_NOTE in report.final.notes
    saved = Report.model_validate_json((Path(lm_recipe["output_dir"]) / "report.json").read_text())
    assert saved.status == "complete" and side_by_side.STOPPED_NOTE in saved.final.notes


def test_side_by_side_pass_in_a_run(lm_recipe):
    lm_recipe["stages"] = [QUANT]
    lm_recipe["eval"]["side_by_side"] = True  # tiny recipes leave it off to keep the suite fast
    report = run(lm_recipe, show_progress=False)
    s = report.side_by_side
    assert s.mode == "interleaved" and s.rounds == 2 and s.repeats == 2 and s.threads >= 1
    assert (s.prompt_tokens, s.new_tokens, s.generate_batch_size) == (16, 4, 2)
    base, final = report.baseline, report.final
    for p in (base, final):
        t = p.timing
        for spread in (t.latency_b1_ms, t.latency_bn_ms, t.ttft_ms, t.decode_b1_tps, t.decode_bn_tps):
            assert 0 < spread.min <= spread.median <= spread.max
        assert p.memory is None  # eval.memory is off in tiny recipes
    assert base.timing.speedup == {}
    assert set(final.timing.speedup) == {"latency_b1", "latency_bn", "ttft", "decode_b1", "decode_bn"}
    for r in final.timing.speedup.values():
        assert r.min <= r.median <= r.max and r.significant == (r.min > 1 or r.max < 1)
    folder = Path(lm_recipe["output_dir"])
    md = (folder / "report.md").read_text()
    assert "## Side by side" in md and "interleaved rounds" in md and "lat b1 ms (alone)" in md
    assert "the round keeps the fastest" in md  # what the figures are, stated where they are quoted
    assert "TTFT ms" in md and "decode tok/s bN" in md
    assert (folder / "plots" / "generation.png").read_bytes()[:4] == b"\x89PNG"
    again = Report.model_validate_json((folder / "report.json").read_text())
    assert again.final.timing == final.timing and again.side_by_side == s


def test_side_by_side_is_on_by_default_and_can_be_turned_off(cls_recipe):
    from compress.recipe import EvalSpec

    assert EvalSpec().side_by_side and EvalSpec().memory and EvalSpec().rounds == 5
    cls_recipe["eval"]["side_by_side"] = False
    report = run(cls_recipe, show_progress=False)
    assert report.side_by_side is None and report.baseline.timing is None
    md = (Path(cls_recipe["output_dir"]) / "report.md").read_text()
    assert "Side by side" not in md and "lat b1 ms (alone)" not in md


def test_generation_longer_than_positions_is_refused_before_work(lm_recipe):
    from compress import preflight
    from compress.loading import load_config

    lm_recipe["eval"].update(side_by_side=True, prompt_tokens=250, new_tokens=10)  # tiny llama: 256 positions
    recipe = load_recipe(lm_recipe)
    problems = preflight.position_problems(load_config(recipe.model), recipe, "causal-lm")
    assert problems == [("eval.prompt_tokens + eval.new_tokens: 250 + 10 tokens is more than the model's 256 "
                         "positions (max_position_embeddings in model.path's config); lower them")]
    assert preflight.position_problems(load_config(recipe.model), recipe, "sequence-classification") == []


def _report(final_timing: SideBySideTiming | None, base_timing: SideBySideTiming | None = None) -> Report:
    speed = SpeedMetrics(device="cpu", threads=1, seq_len=8, batch_size=4, warmup=1, repeats=2, latency_b1_ms=10,
                         latency_bn_ms=40, throughput_per_s=100)
    return Report(name="r", created="now", seed=0, recipe={"eval": {"generate_batch_size": 2}},
                  environment=Environment(python="3", platform="x"),
                  points=[EvalPoint(name="baseline", speed=speed, timing=base_timing),
                          EvalPoint(name="01-quantize", speed=speed.model_copy(update={"latency_bn_ms": 80}),
                                    timing=final_timing)],
                  side_by_side=SideBySide(mode="interleaved", device="cpu", threads=1, rounds=3, repeats=2,
                                          warmup=1, batch_size=4, seq_len=8, generate_batch_size=2)
                  if final_timing else None)


def _sp(median: float) -> Spread:
    return Spread(min=0.9 * median, median=median, max=1.1 * median)


def test_goals_use_side_by_side_medians_and_rate_direction():
    base = SideBySideTiming(latency_bn_ms=_sp(40), decode_b1_tps=_sp(10), decode_bn_tps=_sp(20))
    final = SideBySideTiming(latency_bn_ms=_sp(20), decode_b1_tps=_sp(25), decode_bn_tps=_sp(30))
    goals = {"decode_tps": Goal(min_speedup=2), "decode_tps_b2": Goal(min_speedup=2),
             "latency_b4": Goal(min_speedup=1.5)}
    results = {g.metric: g for g in evaluate_goals(_report(final, base), goals, batch_size=4)}
    assert results["decode_tps"].passed and results["decode_tps"].actual == pytest.approx(2.5)
    assert not results["decode_tps_b2"].passed and results["decode_tps_b2"].actual == pytest.approx(1.5)
    # side by side the final model is 2x faster, though timed alone (speed) it looked 2x slower
    assert results["latency_b4"].passed and results["latency_b4"].actual == pytest.approx(2.0)
    alone = {g.metric: g for g in evaluate_goals(_report(None), {"latency_b4": Goal(min_speedup=1.5)}, 4)}
    assert alone["latency_b4"].actual == pytest.approx(0.5) and not alone["latency_b4"].passed


def test_decode_goal_needs_the_generation_batch(lm_recipe):
    lm_recipe["goals"] = {"decode_tps_b8": {"min_speedup": 2}}  # eval.generate_batch_size is 2
    with pytest.raises(RecipeError, match="decode_tps_bN N = eval.generate_batch_size"):
        load_recipe(lm_recipe)
    lm_recipe["goals"] = {"decode_tps_b2": {"min_speedup": 2}, "ttft": {"max_ratio": 1}}
    assert set(load_recipe(lm_recipe).goals) == {"decode_tps_b2", "ttft"}


def test_reports_and_compare_mark_not_significant_ratios():
    final = SideBySideTiming(latency_b1_ms=_sp(10), latency_bn_ms=_sp(40),
                             speedup={"latency_b1": Ratio(min=0.95, median=1.01, max=1.08, significant=False),
                                      "latency_bn": Ratio(min=1.7, median=1.84, max=1.95, significant=True)})
    report = _report(final, SideBySideTiming(latency_b1_ms=_sp(10), latency_bn_ms=_sp(74)))
    report.points[1].memory = MemoryMetrics(kind="cpu-rss", resident_bytes=2**20, peak_bytes=2**21,
                                            workload="forward 4x8", weight_bytes=2**20)
    md = render_markdown(report)
    assert "1.01× (0.95–1.08, n.s.)" in md and "1.84× (1.70–1.95)" in md
    assert "lat bN ms (alone)" in md and "80 (2.00×)" not in md  # the apart-timed ratio is not shown
    assert "| 01-quantize | 1.0 MiB | – | 2.0 MiB |" in md
    row = next(r for r in compare_rows([report])[1] if r[1] == "01-quantize")
    assert row[6] == "1.84× (1.70–1.95)" and row[5] == "40"


def test_old_reports_without_side_by_side_still_load_and_render():
    old = _report(None).model_dump(mode="json")
    old["schema_version"] = "1.0"
    old.pop("side_by_side")
    for p in old["points"]:
        p.pop("timing"), p.pop("memory")
    report = Report.model_validate_json(json.dumps(old))
    md = render_markdown(report)
    assert "Side by side" not in md and "80 (2.00×)" in md  # ratios of the points' own timing, as before
    row = next(r for r in compare_rows([report])[1] if r[1] == "01-quantize")
    assert row[6] == "0.50 (timed apart)"


@pytest.mark.slow
def test_processes_mode_and_isolated_memory(lm_recipe):
    """Alternating fresh processes for timing, and memory in a fresh process per model (~1 min, loaded CPU)."""
    lm_recipe["stages"] = [QUANT]
    lm_recipe["eval"].update(side_by_side=True, memory=True, side_by_side_mode="processes")
    report = run(lm_recipe, show_progress=False)
    assert report.side_by_side.mode == "processes" and "alternating fresh processes" in report.side_by_side.notes[0]
    assert "fastest of 2 calls" in report.side_by_side.notes[0]
    base, final = report.baseline, report.final
    assert final.timing.speedup["decode_b1"].median > 0 and base.timing.ttft_ms.median > 0
    for p in (base, final):
        m = p.memory
        assert m.kind == "cpu-rss" and m.workload == "generate 2x(16+4)"
        assert 0 < m.resident_bytes <= m.peak_bytes and m.weight_bytes > 0
    # int8 linear weights: the quantized model's tensors are smaller than fp32's
    assert final.memory.weight_bytes < base.memory.weight_bytes
    md = (Path(lm_recipe["output_dir"]) / "report.md").read_text()
    assert "Memory, each model alone" in md and "one fresh process per model" in md


def test_models_too_big_to_hold_together_go_to_fresh_processes(monkeypatch):
    import psutil

    from compress.evaluate.side_by_side import fits_together
    from compress.report.schema import SizeMetrics

    report = _report(None)
    for p in report.points:
        p.size = SizeMetrics(parameters=1, nonzero_parameters=1, sparsity=0, memory_bytes=3 * 2**30)
    free = type("VM", (), {"available": 16 * 2**30})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    assert fits_together(report, ["baseline", "01-quantize"], "cpu")  # 6 GiB of 16 GiB free
    free.available = 10 * 2**30
    assert not fits_together(report, ["baseline", "01-quantize"], "cpu")  # more than half of it
