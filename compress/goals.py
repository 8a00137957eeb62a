"""Metric goals: `goals: {accuracy: {max_drop: 0.01}, latency_b32: {min_speedup: 2.0}}`.

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
    "latency_b1": _speed("latency_b1_ms"),
    "throughput": _speed("throughput_per_s"),
    "peak_memory": _speed("peak_memory_bytes"),
}
LATENCY_BN = re.compile(r"latency_b(\d+)")


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


def metric_getter(name: str, batch_size: int) -> Getter | None:
    if name in METRICS:
        return METRICS[name]
    match = LATENCY_BN.fullmatch(name)
    if match and int(match.group(1)) == batch_size:
        return _speed("latency_bn_ms")
    return None


def metric_names(batch_size: int) -> list[str]:
    return [*METRICS, f"latency_b{batch_size}"]


def _check(rule: str, target: float, base: float | None, final: float) -> tuple[bool, float | None]:
    if rule in ("min", "max"):
        return (final >= target if rule == "min" else final <= target), final
    if base is None:
        return False, None
    value: Any = {
        "max_drop": base - final, "max_increase": final - base,
        "max_ratio": final / base if base else None, "min_ratio": final / base if base else None,
        "min_speedup": base / final if final else None, "min_compression": base / final if final else None,
    }[rule]
    if value is None:
        return False, None
    passed = value <= target + 1e-12 if rule.startswith("max") else value >= target - 1e-12
    return passed, value


def evaluate_goals(report: Report, goals: dict[str, Goal], batch_size: int) -> list[GoalResult]:
    base, final = report.baseline, report.final
    results = []
    for name, goal in goals.items():
        get = metric_getter(name, batch_size)
        for rule, target in goal.model_dump(exclude_none=True).items():
            final_value = get(final) if (get and final) else None
            base_value = get(base) if (get and base) else None
            if final_value is None:
                results.append(GoalResult(metric=name, rule=rule, target=target, passed=False,
                                          detail="not measured (is this metric evaluated?)"))
                continue
            passed, actual = _check(rule, target, base_value, final_value)
            results.append(GoalResult(metric=name, rule=rule, target=target, actual=actual, passed=passed,
                                      baseline=base_value, final=final_value,
                                      detail=None if actual is not None else "no baseline to compare with"))
    return results
