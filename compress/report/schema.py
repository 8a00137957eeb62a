"""The report's data: a schema-versioned pydantic model. Renderers only format it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# 1.1: side-by-side timing, generation speed and isolated memory (all optional: 1.0 reports load).
SCHEMA_VERSION = "1.1"


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


class Spread(_Model):
    """A figure measured once per round: its smallest, median and largest value."""

    min: float
    median: float
    max: float


class Ratio(Spread):
    """Speed-up over the baseline, one value per round (paired within the round); > 1 is faster."""

    significant: bool = Field(description="False when the spread includes 1.0: the difference is noise.")


class SideBySideTiming(_Model):
    """One model's figures from the side-by-side pass (all models timed together, interleaved)."""

    latency_b1_ms: Spread | None = None
    latency_bn_ms: Spread | None = None
    ttft_ms: Spread | None = Field(None, description="Time to first token, prompt of prompt_tokens, batch 1.")
    decode_b1_tps: Spread | None = Field(None, description="Decode tokens/s with the KV cache, batch 1.")
    decode_bn_tps: Spread | None = Field(None, description="Decode tokens/s (all sequences), batch generate_batch_size.")
    speedup: dict[str, Ratio] = Field(default_factory=dict,
                                      description="Against the baseline, by figure (latency_b1, latency_bn, ...).")


class MemoryMetrics(_Model):
    """Memory of one model measured alone, in a fresh process (CPU) or from the allocator (GPU)."""

    kind: str = Field(description="cpu-rss (fresh process per model) or cuda-allocated.")
    resident_bytes: int = Field(description="Memory the loaded model holds: RSS once it has run (buffers freed), "
                                "or CUDA memory allocated after the load, minus the level before the load.")
    peak_bytes: int = Field(description="Peak above the pre-load level during `workload`, weights included.")
    workload: str = Field(description="What ran for the peak, e.g. 'forward 32x128' or 'generate 8x(128+32)'.")
    weight_bytes: int | None = Field(None, description="Bytes of the model's tensors (state_dict), for comparison.")


class SideBySide(_Model):
    """How the side-by-side pass was run; renderers state it next to the ratios."""

    mode: str = Field(description="interleaved (one process) or processes (alternating fresh processes).")
    device: str
    threads: int
    rounds: int
    repeats: int = Field(description="Calls per model per round for forward timing (the round keeps the fastest).")
    warmup: int
    batch_size: int
    seq_len: int
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    generate_batch_size: int | None = None
    load_average: list[float] | None = Field(None, description="1-minute load average before and after the pass.")
    seconds: float | None = None
    memory_isolation: str | None = Field(None, description="How memory was isolated, in words.")
    notes: list[str] = Field(default_factory=list)


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
    timing: SideBySideTiming | None = Field(None, description="From the side-by-side pass (report.side_by_side).")
    memory: MemoryMetrics | None = None
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
    side_by_side: SideBySide | None = Field(None, description="Settings of the side-by-side pass, if one ran.")

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
