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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.bundle import ModelBundle, detect_task, load_tokenizer
from compress.context import RunContext
from compress.data import pad_collate
from compress.distill import compat
from compress.distill import student as st
from compress.distill.cache import build_cache, fingerprint
from compress.distill.objective import Objective, StudentWithProjections
from compress.errors import CompressError, StageError
from compress.evaluate.accuracy import evaluate_accuracy
from compress.paths import looks_like_local_path, resolve_path
from compress.registry import StageConfig, StageResult, register_stage
from compress.training import TrainingFields
from compress.training import adapters as ad
from compress.training.entry import held_out_evaluator, train_in_stage
from compress.training.loop import sharding_problems

STAGE_REF = "stage:"


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


# ------------------------------------------------------------------------------- teacher/student sources


def _stage_folder(config: Distill, ctx: RunContext) -> tuple[Path | None, str | None]:
    """The folder of the earlier stage named by `teacher: stage:X`, or the problem with the reference."""
    earlier, problem = ctx.find_earlier(config.teacher[len(STAGE_REF):])
    if earlier is None:
        return None, f"teacher: {config.teacher!r} {problem}; name one by number or name"
    return earlier.folder, None


def _describe(path: str) -> tuple[Any, Any, str]:
    """(config, tokenizer, task) of a model on disk, without loading weights."""
    import json

    from transformers import AutoConfig

    location = str(resolve_path(path)) if looks_like_local_path(path) else path
    config = AutoConfig.from_pretrained(location)
    meta = Path(location) / "compress_bundle.json"
    task = json.loads(meta.read_text())["task"] if meta.exists() else detect_task(config)
    return config, load_tokenizer(location), task


def _layers(config: Any) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or 0)


# ------------------------------------------------------------------------------- check


def check_distill(bundle: ModelBundle, config: Distill, ctx: RunContext) -> list[str]:
    """Model-dependent mistakes, before any work: sources, layers, vocabulary, task and labels."""
    problems: list[str] = sharding_problems(config, ctx.device)
    t_config, t_tok, t_task = bundle.model.config, bundle.tokenizer, bundle.task
    if config.teacher is not None and config.teacher.startswith(STAGE_REF):
        problems += [p for p in [_stage_folder(config, ctx)[1]] if p]
    elif config.teacher is not None:
        try:
            t_config, t_tok, t_task = _describe(config.teacher)
        except (OSError, ValueError, CompressError) as exc:
            return [(f"teacher: cannot load {config.teacher!r} ({str(exc).splitlines()[0]}); give a model "
                    f"folder, pkg: path or Hub id")]
    # What the student will look like, from configs only.
    s_config, s_tok, s_task = bundle.model.config, bundle.tokenizer, bundle.task
    layers = _layers(t_config)
    if config.student_model is not None:
        try:
            s_config, s_tok, s_task = _describe(config.student_model)
        except CompressError:  # a bare encoder: it gets the teacher's task and labels on load
            s_config, s_tok = _describe_bare(config.student_model)
            s_task = t_task
            s_config.num_labels, s_config.id2label = t_config.num_labels, t_config.id2label
        except (OSError, ValueError) as exc:
            return problems + [(f"student_model: cannot load {config.student_model!r} "
                               f"({str(exc).splitlines()[0]}); give a model folder, pkg: path or Hub id")]
    elif config.keep_every is not None or config.keep_layers is not None:
        keep = config.keep_layers or st.every_kth(layers, config.keep_every)
        if config.keep_every is not None and config.keep_every > layers:
            problems.append(f"keep_every: {config.keep_every} is more than the teacher's {layers} layers; "
                            f"use 2..{layers}")
        bad = [i for i in keep if i >= layers]
        if bad:
            problems.append(f"keep_layers: {bad} do not exist; the teacher has layers 0..{layers - 1}")
        elif config.teacher is None and (why := st.layers_mismatch(bundle.model, keep, t_task)):
            problems.append(f"{'keep_layers' if config.keep_layers else 'keep_every'}: {why}")
        s_config, s_tok, s_task = _with(t_config, num_hidden_layers=len(keep)), t_tok, t_task
    elif config.student_config is not None:
        unknown = [k for k in config.student_config if not hasattr(t_config, k)]
        if unknown:
            problems.append(f"student_config: {unknown} are not settings of {type(t_config).__name__}; "
                            f"use keys of the teacher's config.json")
            return problems
        try:
            st.student_from_config(t_config, config.student_config, t_task, meta=True)
        except Exception as exc:  # noqa: BLE001 - any construction error is the user's config
            return problems + [(f"student_config: these settings do not make a valid model ({exc}); "
                               f"e.g. hidden_size must be a multiple of num_attention_heads")]
        s_config, s_tok, s_task = _with(t_config, **config.student_config), t_tok, t_task
    elif ad.count_bnb(bundle.model):
        problems.append("teacher: the student would be the incoming model, which is quantized and cannot be "
                        "trained; distil before quantizing, or set student_model / keep_every")
    if config.teacher is None or not config.teacher.startswith(STAGE_REF):
        problems += compat.compatibility_problems(t_config, t_tok, t_task, s_config, s_tok, s_task)
    problems += _matching_problems(config, t_config, s_config)
    return problems


def _describe_bare(path: str) -> tuple[Any, Any]:
    from transformers import AutoConfig

    location = str(resolve_path(path)) if looks_like_local_path(path) else path
    return AutoConfig.from_pretrained(location), load_tokenizer(location)


def _with(config: Any, **changes: Any) -> Any:
    import copy

    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _matching_problems(config: Distill, t_config: Any, s_config: Any) -> list[str]:
    problems: list[str] = []
    t_layers, s_layers = _layers(t_config), _layers(s_config)
    if config.layer_map:
        bad = {s: t for s, t in config.layer_map.items() if not (0 <= s <= s_layers and 0 <= t <= t_layers)}
        if bad:
            problems.append(f"layer_map: {bad} is out of range; student layers are 0..{s_layers} and teacher "
                            f"layers 0..{t_layers} (0 = embeddings)")
    if config.attention_weight > 0:
        t_heads = getattr(t_config, "num_attention_heads", None)
        s_heads = getattr(s_config, "num_attention_heads", None)
        if t_heads != s_heads:
            problems.append(f"attention_weight: attention transfer compares maps head by head, but the "
                            f"teacher has {t_heads} heads and the student {s_heads}; use equal head counts "
                            f"or set attention_weight: 0")
    return problems


# ------------------------------------------------------------------------------- run


def _teacher(bundle: ModelBundle, config: Distill, ctx: RunContext) -> tuple[Any, Any, str, str]:
    if config.teacher is None:
        return bundle.model, bundle.tokenizer, bundle.task, "incoming model"
    if config.teacher.startswith(STAGE_REF):
        folder, problem = _stage_folder(config, ctx)
        if problem:
            raise StageError(problem)
        loaded = ModelBundle.load(folder, device=ctx.device)
        return loaded.model, loaded.tokenizer, loaded.task, f"{config.teacher} ({folder.name})"
    model, tok, task = st.load_model(config.teacher, bundle.task, device=ctx.device)
    return model, tok, task, config.teacher


def _student(bundle: ModelBundle, config: Distill, teacher: Any, t_tok: Any, t_task: str,
             ctx: RunContext) -> tuple[Any, Any, list[int] | None, str]:
    if config.student_model is not None:
        model, tok, _ = st.load_model(config.student_model, t_task, teacher.config.num_labels,
                                      getattr(teacher.config, "id2label", None), device=ctx.device,
                                      field="student_model")
        return model, tok, None, config.student_model
    derived = config.keep_every is not None or config.keep_layers is not None or config.student_config
    if derived and config.teacher is None and bundle.format != "hf":
        raise StageError(f"teacher: the incoming model is stored as {bundle.format!r} (an adapter or quantized "
                         f"layers), so no student can be cut from its weights; merge the adapter first "
                         f"(merge: merge) or distil before quantizing")
    if config.keep_every is not None or config.keep_layers is not None:
        keep = config.keep_layers or st.every_kth(_layers(teacher.config), config.keep_every)
        try:
            student = st.student_from_layers(teacher, keep, t_task)
        except ValueError as exc:  # a teacher named by path: check_distill could not see its layers
            raise StageError(f"{'keep_layers' if config.keep_layers else 'keep_every'}: {exc}") from exc
        return student, t_tok, keep, f"teacher layers {keep}"
    if config.student_config is not None:
        model = st.student_from_config(teacher.config, config.student_config, t_task, seed=ctx.seed,
                                       teacher=teacher)
        return model, t_tok, None, f"teacher config with {config.student_config}"
    return bundle.model, bundle.tokenizer, None, "incoming model"


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Pair:
    """The teacher and the student of one distillation, checked to be compatible."""

    teacher: Any
    t_tok: Any
    task: str
    teacher_desc: str
    student: Any
    s_tok: Any
    kept: list[int] | None
    student_desc: str
    student_is_incoming: bool


def _load_pair(bundle: ModelBundle, config: Distill, ctx: RunContext) -> _Pair:
    teacher, t_tok, t_task, teacher_desc = _teacher(bundle, config, ctx)
    student, s_tok, kept, student_desc = _student(bundle, config, teacher, t_tok, t_task, ctx)
    incoming = student is bundle.model
    problems = compat.compatibility_problems(teacher.config, t_tok, t_task, student.config, s_tok, t_task
                                             if not incoming else bundle.task)
    problems += _matching_problems(config, teacher.config, student.config)
    if problems:
        raise StageError("; ".join(problems))
    if student is teacher:
        raise StageError("teacher: the teacher and the student are the same model; name a student")
    return _Pair(teacher, t_tok, t_task, teacher_desc, student, s_tok, kept, student_desc, incoming)


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


def _teacher_cache(pair: _Pair, config: Distill, train_set: Any, collate: Any, vocab: int,
                   ctx: RunContext) -> Any:
    """The teacher's top-k softened outputs on the training set, on disk, when asked for (α < 1 only:
    α = 1 never reads the teacher)."""
    if config.teacher_cache != "disk" or config.alpha >= 1:
        return None
    cached_set = train_set.select(range(min(config.max_train_samples or len(train_set), len(train_set))))
    # Names the teacher by a checksum of a few of its tensors, so a changed teacher never reads a
    # stale cache (hashing every weight of a large teacher would cost more than it saves).
    probe = float(sum(p.double().sum() for p in list(pair.teacher.parameters())[:4]))
    key = fingerprint(pair.teacher_desc, _params(pair.teacher), probe, cached_set._fingerprint,
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
    pair = _load_pair(bundle, config, ctx)
    teacher, student, t_task = pair.teacher, pair.student, pair.task
    vocab = len(pair.s_tok) if t_task == "causal-lm" else teacher.config.num_labels

    teacher.eval().to(ctx.device)
    teacher.requires_grad_(False)
    student.requires_grad_(True)
    s_layers, t_layers = _layers(student.config), _layers(teacher.config)
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
    t_params, s_params = _params(teacher), _params(student)
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
