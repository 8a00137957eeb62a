"""Distillation stage: teacher -> student with soft-target KL, optional hidden-state / attention matching.

Loss: α·CE(student, labels) + (1−α)·τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), on the shared
training loop (accelerate: checkpoints, resume, several processes). The teacher is the incoming
model, a named model, or an earlier stage's output; the student is a given model, the teacher cut
to fewer layers (weights copied), a smaller config, or the incoming model (when the teacher is
named), which keeps a pruned model's masks while it recovers from its unpruned self.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.data import pad_collate
from compress.distill import student as st
from compress.distill.cache import build_cache, fingerprint
from compress.distill.objective import Objective, StudentWithProjections
from compress.distill.pair import STAGE_REF, Pair, layer_count, load_pair, parameter_count, source_problems
from compress.evaluate.accuracy import evaluate_accuracy
from compress.registry import StageConfig, StageResult, register_stage
from compress.training import TrainingFields
from compress.training.entry import held_out_evaluator, train_in_stage


class Distill(StageConfig, TrainingFields):
    """Distil a teacher into a smaller student: soft-target KL plus optional hidden/attention matching."""

    type: Literal["distill"] = "distill"
    teacher: str | None = Field(
        None, description="Unset: the model this stage receives. Else a model folder, pkg: path or Hub id, "
                          "or 'stage:N' / 'stage:NAME' for the output of an earlier stage of this run "
                          "(N from 1).")
    student_model: str | None = Field(None, description="Student: a model folder, pkg: path or Hub id.")
    keep_every: int | None = Field(
        None, ge=2, description="Student: the teacher keeping every k-th transformer layer (layers k-1, "
                                "2k-1, …, so the top one stays), weights copied.")
    keep_layers: list[int] | None = Field(
        None, min_length=1, description="Student: the teacher keeping these layers (0-based, ascending), "
                                        "weights copied.")
    student_config: dict[str, Any] | None = Field(
        None, description="Student: the teacher's config with these changes (e.g. num_hidden_layers, "
                          "hidden_size, intermediate_size), randomly initialised.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the hard-label cross-entropy; 1−α goes to "
                                                      "the soft-target KL.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature τ for the soft targets (KL is "
                                                      "scaled by τ²).")
    kl_direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(teacher‖student), mass-covering; reverse: KL(student‖teacher), "
                               "mode-seeking (often better for causal-LM students).")
    hidden_loss: Literal["none", "mse", "cosine"] = Field(
        "none", description="Match hidden states of mapped layers (a learned projection bridges different "
                            "hidden sizes).")
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state loss.")
    attention_weight: float = Field(
        0.0, ge=0, description="Weight of attention-map transfer (KL between attention rows of mapped "
                               "layers; needs equal head counts).")
    layer_map: dict[int, int] | None = Field(
        None, description="Student layer -> teacher layer for hidden/attention matching (1-based; 0 = "
                          "embeddings). Default: kept layers to their origin, else spread evenly.")
    teacher_cache: Literal["none", "disk"] = Field(
        "none", description="none: run the teacher on every batch; disk: compute its top-k outputs once "
                            "into the work folder and reuse them every epoch.")
    cache_top_k: int = Field(64, gt=0, description="Classes/tokens kept per position in the teacher cache "
                                                   "(the rest of the mass is spread evenly, which flattens a "
                                                   "large-vocabulary LM's targets: reports/distill.md).")

    @model_validator(mode="after")
    def _combinations(self) -> Distill:
        chosen = [n for n in ("student_model", "keep_every", "keep_layers", "student_config")
                  if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"{chosen[1]}: the student is already given by {chosen[0]}; keep one of "
                             f"student_model, keep_every, keep_layers, student_config")
        if not chosen and self.teacher is None:
            raise ValueError("teacher: the teacher is the incoming model, so the student must be named: set "
                             "keep_every, keep_layers, student_config or student_model (or set teacher to "
                             "distil into the incoming model)")
        if self.keep_layers is not None and (self.keep_layers != sorted(set(self.keep_layers))
                                             or min(self.keep_layers) < 0):
            raise ValueError(f"keep_layers: {self.keep_layers} must be distinct, ascending, 0-based layer "
                             f"indices")
        if self.teacher_cache == "disk" and (self.hidden_loss != "none" or self.attention_weight > 0):
            raise ValueError("teacher_cache: hidden-state and attention matching need the teacher's full "
                             "forward pass on every batch; use teacher_cache: none")
        if self.layer_map is not None and self.hidden_loss == "none" and self.attention_weight == 0:
            raise ValueError("layer_map: only hidden_loss and attention_weight use it; set one or remove it")
        if self.teacher is not None and self.teacher.strip() == STAGE_REF:
            raise ValueError("teacher: 'stage:' needs a stage number or name, e.g. stage:1")
        return self


def check_distill(bundle: ModelBundle, config: Distill, ctx: RunContext) -> list[str]:
    """Model-dependent mistakes, before any work: sources, layers, vocabulary, task and labels."""
    return source_problems(bundle, config, ctx)


# ------------------------------------------------------------------------------- run


@contextmanager
def _eager_attention(models: list[Any], needed: bool) -> Iterator[None]:
    """Only eager attention returns the attention maps that attention matching compares."""
    before = {id(m): m.config._attn_implementation for m in models} if needed else {}
    for m in models if needed else []:
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m in models if needed else []:
            m.set_attn_implementation(before[id(m)])


def _teacher_cache(pair: Pair, config: Distill, train_set: Any, collate: Any, vocab: int,
                   ctx: RunContext) -> Any:
    """The teacher's top-k softened outputs on the training set, on disk, when asked for (α < 1 only:
    α = 1 never reads the teacher)."""
    if config.teacher_cache != "disk" or config.alpha >= 1:
        return None
    cached_set = train_set.select(range(min(config.max_train_samples or len(train_set), len(train_set))))
    # Names the teacher by a checksum of a few of its tensors, so a changed teacher never reads a
    # stale cache (hashing every weight of a large teacher would cost more than it saves).
    probe = float(sum(p.double().sum() for p in list(pair.teacher.parameters())[:4]))
    key = fingerprint(pair.teacher_desc, parameter_count(pair.teacher), probe, cached_set._fingerprint,
                      config.temperature, vocab)
    return build_cache(pair.teacher, cached_set, collate, k=config.cache_top_k, temperature=config.temperature,
                       vocab=vocab, device=ctx.device, folder=ctx.work_dir / "teacher-cache", key=key)


def _indexed_collate(tokenizer: Any) -> Any:
    """Padding collate that also carries each row's index (the teacher cache is keyed by it)."""
    base_collate = pad_collate(tokenizer)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = base_collate(rows)
        batch["example_index"] = torch.tensor([r["example_index"] for r in rows])
        return batch

    return collate


def run_distill(bundle: ModelBundle, config: Distill, ctx: RunContext) -> StageResult:
    data = ctx.require_data("distill")
    pair = load_pair(bundle, config, ctx)
    teacher, student, t_task = pair.teacher, pair.student, pair.task
    vocab = len(pair.s_tok) if t_task == "causal-lm" else teacher.config.num_labels

    teacher.eval().to(ctx.device)
    teacher.requires_grad_(False)
    student.requires_grad_(True)
    s_layers, t_layers = layer_count(student.config), layer_count(teacher.config)
    layer_map = config.layer_map or st.default_layer_map(s_layers, t_layers, pair.kept)
    wrapper = StudentWithProjections(student, layer_map, student.config.hidden_size,
                                     teacher.config.hidden_size,
                                     with_projections=config.hidden_loss != "none")

    train_set = data.tokenized("train", pair.s_tok)
    train_set = train_set.add_column("example_index", list(range(len(train_set))))
    eval_set = data.tokenized("eval", pair.s_tok)
    collate = _indexed_collate(pair.s_tok)
    cache = _teacher_cache(pair, config, train_set, collate, vocab, ctx)
    objective = Objective(teacher=teacher, task=t_task, vocab=vocab, alpha=config.alpha,
                          temperature=config.temperature, direction=config.kl_direction,
                          hidden_kind=config.hidden_loss, hidden_weight=config.hidden_weight,
                          attention_weight=config.attention_weight, layer_map=layer_map, cache=cache)
    masks = {f"student.{k}": v for k, v in bundle.masks.items()} if pair.student_is_incoming else {}

    evaluate = held_out_evaluator(eval_set, pair.s_tok, t_task, device=ctx.device, num_labels=data.num_labels,
                                  pick=lambda wrapped: wrapped.student)
    with _eager_attention([teacher, student], config.attention_weight > 0):
        result = train_in_stage(wrapper, train_set, collate, config, ctx, task=t_task, evaluate=evaluate,
                                loss_fn=objective, masks=masks or None)
    student.requires_grad_(False)
    student.eval()

    t_metrics, t_preds = evaluate_accuracy(teacher, eval_set, pair.t_tok, t_task, device=ctx.device,
                                           num_labels=data.num_labels)
    s_metrics, _ = evaluate_accuracy(student, eval_set, pair.s_tok, t_task, device=ctx.device,
                                     num_labels=data.num_labels, reference=t_preds)
    t_params, s_params = parameter_count(teacher), parameter_count(student)
    metric = "accuracy" if t_task == "sequence-classification" else "perplexity"
    t_score, s_score = getattr(t_metrics, metric), getattr(s_metrics, metric)
    facts: dict[str, Any] = {
        "teacher": pair.teacher_desc,
        "student": pair.student_desc,
        "teacher_parameters": t_params,
        "student_parameters": s_params,
        "parameter_ratio": round(s_params / t_params, 4),
        "teacher_layers": t_layers,
        "student_layers": s_layers,
        f"teacher_{metric}": t_score,
        f"student_{metric}": s_score,
        "agreement_with_teacher": s_metrics.agreement,
        "alpha": config.alpha,
        "temperature": config.temperature,
        "kl_direction": config.kl_direction,
        "teacher_cache": "disk" if cache is not None else "none",
        "layer_map": {str(k): v for k, v in layer_map.items()} if config.hidden_loss != "none"
        or config.attention_weight > 0 else None,
        "projections": len(wrapper.proj),
        **objective.mean_parts(),
        **result.summary(),
    }
    if metric == "accuracy" and t_score:
        facts["accuracy_kept"] = round(s_score / t_score, 4)
    if result.eval_curve:
        facts.update({f"last_eval_{k}": v for k, v in result.eval_curve[-1][1].items()})
    incoming = pair.student_is_incoming
    out = bundle.replace(model=student, tokenizer=pair.s_tok, task=t_task,
                         masks=bundle.masks if incoming else {}, format=bundle.format if incoming else "hf")
    out.record("distill", config.model_dump(mode="json"),
               **{k: v for k, v in facts.items() if k not in ("loss_curve", "eval_curve")})
    return StageResult(out, facts)


register_stage(Distill, run_distill, check=check_distill, distributed=True)

__all__ = ["Distill", "check_distill", "run_distill"]
