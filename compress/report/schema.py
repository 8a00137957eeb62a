"""The report's data: a schema-versioned pydantic model. Renderers only format it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"


class _Model(BaseModel):
    # Tolerant of fields added by newer versions when reading an older report back.
    model_config = ConfigDict(extra="allow")


class LayerSize(_Model):
    name: str
    parameters: int = Field(description="Logical weights of the layer.")
    nonzero: int
    bits_per_weight: float = Field(description="Stored bytes of the layer (weights, scales, zero points) * 8 / parameters.")


class SizeMetrics(_Model):
    parameters: int = Field(description="Logical weights (a 4-bit weight counts as one).")
    nonzero_parameters: int
    sparsity: float = Field(description="Share of parameters that are exactly zero.")
    memory_bytes: int = Field(description="Bytes of parameters and buffers in memory.")
    disk_bytes: int | None = Field(None, description="Bytes of the saved weight files (safetensors).")
    bits_per_weight: float | None = Field(None, description="8 * disk_bytes / parameters (scales included).")
    layers: list[LayerSize] = Field(default_factory=list, description="Per weight matrix (linear and embedding).")


class SpeedMetrics(_Model):
    device: str
    threads: int
    seq_len: int
    batch_size: int
    warmup: int
    repeats: int
    latency_b1_ms: float = Field(description="Median latency of one sequence.")
    latency_bn_ms: float = Field(description="Median latency of a batch of `batch_size`.")
    throughput_per_s: float = Field(description="Sequences per second at batch `batch_size`.")
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = Field(None, description="cuda-allocated or cpu-rss-increase.")


class AccuracyMetrics(_Model):
    examples: int
    accuracy: float | None = None
    macro_f1: float | None = None
    perplexity: float | None = None
    eval_loss: float | None = None
    agreement: float | None = Field(None, description="Share of predictions equal to the baseline's.")
    lm_eval: dict[str, dict[str, float]] | None = Field(None, description="lm-evaluation-harness results by task.")


class EvalPoint(_Model):
    name: str = Field(description="`baseline` or the stage folder name, e.g. 01-finetune.")
    stage_type: str | None = None
    size: SizeMetrics | None = None
    speed: SpeedMetrics | None = None
    accuracy: AccuracyMetrics | None = None
    stage_seconds: float | None = None
    stage_info: dict[str, Any] = Field(default_factory=dict, description="What the stage reported.")
    notes: list[str] = Field(default_factory=list)


class GoalResult(_Model):
    metric: str
    rule: str = Field(description="max_drop, min_speedup, ... (see compress.goals.Goal)")
    target: float
    actual: float | None = Field(None, description="The value the rule compares (a drop, ratio, or the metric).")
    baseline: float | None = None
    final: float | None = None
    passed: bool
    detail: str | None = None


class Environment(_Model):
    python: str
    platform: str
    cpu: str | None = None
    cpu_count: int | None = None
    gpu: str | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)


class Report(_Model):
    schema_version: str = SCHEMA_VERSION
    name: str
    created: str
    status: str = Field("running", description="running, complete, failed or interrupted")
    error: str | None = None
    failed_stage: str | None = Field(None, description="The stage folder that was running when the run stopped.")
    seed: int
    recipe: dict[str, Any]
    environment: Environment
    points: list[EvalPoint] = Field(default_factory=list)
    goals: list[GoalResult] = Field(default_factory=list)

    @property
    def goals_passed(self) -> bool:
        return all(g.passed for g in self.goals)

    def point(self, name: str) -> EvalPoint | None:
        return next((p for p in self.points if p.name == name), None)

    @property
    def baseline(self) -> EvalPoint | None:
        return self.point("baseline")

    @property
    def final(self) -> EvalPoint | None:
        return self.points[-1] if self.points else None
