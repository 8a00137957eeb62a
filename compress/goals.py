"""Metric goals: `goals: {accuracy: {max_drop: 0.01}, latency_b32: {min_speedup: 2.0}, decode_tps: {min_speedup: 2}}`.

Speed goals (latency_b1, latency_bN, throughput, ttft, decode_tps, decode_tps_bN) use the side-by-side
medians when the run has them; min_speedup is "faster by": baseline/final for times, final/baseline
for rates (throughput, tokens/s). Memory goals use the isolated per-model memory.

Each goal compares the final eval point with the baseline (or, for `min`/`max`, checks the final
value alone). The outcome is stored in the report; `compress run --strict` fails on a miss.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.report.schema import EvalPoint, GoalResult, Report

Getter = Callable[[EvalPoint], float | None]


def _acc(field: str) -> Getter:
    return lambda p: getattr(p.accuracy, field) if p.accuracy else None


def _size(field: str) -> Getter:
    return lambda p: getattr(p.size, field) if p.size else None


def _speed(field: str) -> Getter:
    return lambda p: getattr(p.speed, field) if p.speed else None


def _timed(field: str, fallback: str | None = None) -> Getter:
    """A side-by-side median when the run has one, else the figure timed alone at the point."""
    def get(p: EvalPoint) -> float | None:
        value = getattr(p.timing, field, None) if p.timing else None
        if value is not None:
            return value.median
        return getattr(p.speed, fallback) if (fallback and p.speed) else None
    return get


def _memory(field: str, fallback: str | None = None) -> Getter:
    def get(p: EvalPoint) -> float | None:
        if p.memory is not None:
            return getattr(p.memory, field)
        return getattr(p.speed, fallback) if (fallback and p.speed) else None
    return get


def _throughput(p: EvalPoint) -> float | None:
    if p.timing and p.timing.latency_bn_ms and p.speed:
        return p.speed.batch_size / (p.timing.latency_bn_ms.median / 1000)
    return p.speed.throughput_per_s if p.speed else None


METRICS: dict[str, Getter] = {
    "accuracy": _acc("accuracy"),
    "macro_f1": _acc("macro_f1"),
    "agreement": _acc("agreement"),
    "perplexity": _acc("perplexity"),
    "eval_loss": _acc("eval_loss"),
    "disk_bytes": _size("disk_bytes"),
    "memory_bytes": _size("memory_bytes"),
    "parameters": _size("parameters"),
    "bits_per_weight": _size("bits_per_weight"),
    "sparsity": _size("sparsity"),
    "latency_b1": _timed("latency_b1_ms", "latency_b1_ms"),
    "throughput": _throughput,
    "peak_memory": _memory("peak_bytes", "peak_memory_bytes"),
    "resident_memory": _memory("resident_bytes"),
    "ttft": _timed("ttft_ms"),
    "decode_tps": _timed("decode_b1_tps"),
}
# Figures where more is better: min_speedup is final / baseline for them (baseline / final for times).
HIGHER_IS_BETTER = {"throughput", "decode_tps", "decode_tps_bN"}
LATENCY_BN = re.compile(r"latency_b(\d+)")
DECODE_BN = re.compile(r"decode_tps_b(\d+)")


class Goal(BaseModel):
    """One metric's target. Drops/increases are absolute (accuracy 0.01 = one point)."""

    model_config = ConfigDict(extra="forbid")

    max_drop: float | None = Field(None, ge=0, description="baseline - final <= this")
    max_increase: float | None = Field(None, ge=0, description="final - baseline <= this")
    max_ratio: float | None = Field(None, gt=0, description="final / baseline <= this")
    min_ratio: float | None = Field(None, gt=0, description="final / baseline >= this")
    min_speedup: float | None = Field(None, gt=0, description="baseline / final >= this (latency)")
    min_compression: float | None = Field(None, gt=0, description="baseline / final >= this (sizes)")
    min: float | None = Field(None, description="final >= this")
    max: float | None = Field(None, description="final <= this")

    @model_validator(mode="after")
    def _at_least_one(self) -> Goal:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("give at least one rule: " + ", ".join(type(self).model_fields))
        return self


def metric_getter(name: str, batch_size: int, generate_batch_size: int | None = None) -> Getter | None:
    if name in METRICS:
        return METRICS[name]
    match = LATENCY_BN.fullmatch(name)
    if match and int(match.group(1)) == batch_size:
        return _timed("latency_bn_ms", "latency_bn_ms")
    match = DECODE_BN.fullmatch(name)
    if match and generate_batch_size is not None and int(match.group(1)) == generate_batch_size:
        return _timed("decode_bn_tps")
    return None


def metric_names(batch_size: int, generate_batch_size: int | None = None) -> list[str]:
    extra = [f"decode_tps_b{generate_batch_size}"] if generate_batch_size is not None else []
    return [*METRICS, f"latency_b{batch_size}", *extra]


def _higher_is_better(name: str) -> bool:
    return name in HIGHER_IS_BETTER or DECODE_BN.fullmatch(name) is not None


def _check(rule: str, target: float, base: float | None, final: float,
           higher_is_better: bool = False) -> tuple[bool, float | None]:
    if rule in ("min", "max"):
        return (final >= target if rule == "min" else final <= target), final
    if base is None:
        return False, None
    speedup = (final / base if base else None) if higher_is_better else (base / final if final else None)
    value: Any = {
        "max_drop": base - final, "max_increase": final - base,
        "max_ratio": final / base if base else None, "min_ratio": final / base if base else None,
        "min_speedup": speedup, "min_compression": base / final if final else None,
    }[rule]
    if value is None:
        return False, None
    passed = value <= target + 1e-12 if rule.startswith("max") else value >= target - 1e-12
    return passed, value


def evaluate_goals(report: Report, goals: dict[str, Goal], batch_size: int,
                   generate_batch_size: int | None = None) -> list[GoalResult]:
    """Each goal's rules checked on the final point against the baseline. Speed figures come from the
    side-by-side pass when the run has one (medians over rounds), else from the points' own timing."""
    base, final = report.baseline, report.final
    if generate_batch_size is None:
        generate_batch_size = (report.side_by_side.generate_batch_size if report.side_by_side else None) or \
            report.recipe.get("eval", {}).get("generate_batch_size")
    results = []
    for name, goal in goals.items():
        get = metric_getter(name, batch_size, generate_batch_size)
        for rule, target in goal.model_dump(exclude_none=True).items():
            final_value = get(final) if (get and final) else None
            base_value = get(base) if (get and base) else None
            if final_value is None:
                results.append(GoalResult(metric=name, rule=rule, target=target, passed=False,
                                          detail="not measured (is this metric evaluated?)"))
                continue
            passed, actual = _check(rule, target, base_value, final_value, _higher_is_better(name))
            results.append(GoalResult(metric=name, rule=rule, target=target, actual=actual, passed=passed,
                                      baseline=base_value, final=final_value,
                                      detail=None if actual is not None else "no baseline to compare with"))
    return results
