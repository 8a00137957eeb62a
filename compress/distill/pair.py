"""A distillation's teacher and student: where each comes from, checked before any weights load, then
loaded as a compatible pair.

The teacher is the incoming model, a named model, or an earlier stage's output (`teacher: stage:X`);
the student is a named model, the teacher cut to some of its layers, a smaller config, or the incoming
model (when the teacher is named).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.bundle import ModelBundle, detect_task, load_tokenizer
from compress.distill import compat
from compress.distill import student as st
from compress.errors import CompressError, StageError
from compress.modelconfig import derived_config
from compress.paths import looks_like_local_path, resolve_path
from compress.training import adapters as ad
from compress.training.sharding import sharding_problems

if TYPE_CHECKING:
    from compress.context import RunContext
    from compress.stages.distill import Distill

STAGE_REF = "stage:"


def stage_folder(config: Distill, ctx: RunContext) -> tuple[Path | None, str | None]:
    """The folder of the earlier stage named by `teacher: stage:X`, or the problem with the reference."""
    earlier, problem = ctx.find_earlier(config.teacher[len(STAGE_REF):])
    if earlier is None:
        return None, f"teacher: {config.teacher!r} {problem}; name one by number or name"
    return earlier.folder, None


def describe(path: str) -> tuple[Any, Any, str]:
    """(config, tokenizer, task) of a model on disk, without loading weights."""
    import json

    from transformers import AutoConfig

    location = str(resolve_path(path)) if looks_like_local_path(path) else path
    config = AutoConfig.from_pretrained(location)
    meta = Path(location) / "compress_bundle.json"
    task = json.loads(meta.read_text())["task"] if meta.exists() else detect_task(config)
    return config, load_tokenizer(location), task


def layer_count(config: Any) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def source_problems(bundle: ModelBundle, config: Distill, ctx: RunContext) -> list[str]:
    """Model-dependent mistakes of a distillation's teacher and student, from their configs and tokenizers
    only (before any weights load): sources, layers, vocabulary, task and labels."""
    from compress.training.adapters import count_bnb

    # A 4-bit (bitsandbytes) model here is the teacher, or the student derived from it: neither shards.
    problems: list[str] = sharding_problems(config, ctx.device, four_bit=bool(count_bnb(bundle.model)))
    t_config, t_tok, t_task = bundle.model.config, bundle.tokenizer, bundle.task
    if config.teacher is not None and config.teacher.startswith(STAGE_REF):
        problems += [p for p in [stage_folder(config, ctx)[1]] if p]
    elif config.teacher is not None:
        try:
            t_config, t_tok, t_task = describe(config.teacher)
        except (OSError, ValueError, CompressError) as exc:
            return [(f"teacher: cannot load {config.teacher!r} ({str(exc).splitlines()[0]}); give a model "
                    f"folder, pkg: path or Hub id")]
    # What the student will look like, from configs only.
    s_config, s_tok, s_task = bundle.model.config, bundle.tokenizer, bundle.task
    layers = layer_count(t_config)
    if config.student_model is not None:
        try:
            s_config, s_tok, s_task = describe(config.student_model)
        except CompressError:  # a bare encoder: it gets the teacher's task and labels on load
            s_config, s_tok = describe_bare(config.student_model)
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
        s_config, s_tok, s_task = derived_config(t_config, {"num_hidden_layers": len(keep)}), t_tok, t_task
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
        s_config, s_tok, s_task = derived_config(t_config, config.student_config), t_tok, t_task
    elif ad.count_bnb(bundle.model):
        problems.append("teacher: the student would be the incoming model, which is quantized and cannot be "
                        "trained; distil before quantizing, or set student_model / keep_every")
    if config.teacher is None or not config.teacher.startswith(STAGE_REF):
        problems += compat.compatibility_problems(t_config, t_tok, t_task, s_config, s_tok, s_task)
    problems += matching_problems(config, t_config, s_config)
    return problems


def describe_bare(path: str) -> tuple[Any, Any]:
    from transformers import AutoConfig

    location = str(resolve_path(path)) if looks_like_local_path(path) else path
    return AutoConfig.from_pretrained(location), load_tokenizer(location)


def matching_problems(config: Distill, t_config: Any, s_config: Any) -> list[str]:
    problems: list[str] = []
    t_layers, s_layers = layer_count(t_config), layer_count(s_config)
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


def load_teacher(bundle: ModelBundle, config: Distill, ctx: RunContext) -> tuple[Any, Any, str, str]:
    if config.teacher is None:
        return bundle.model, bundle.tokenizer, bundle.task, "incoming model"
    if config.teacher.startswith(STAGE_REF):
        folder, problem = stage_folder(config, ctx)
        if problem:
            raise StageError(problem)
        loaded = ModelBundle.load(folder, device=ctx.device)
        return loaded.model, loaded.tokenizer, loaded.task, f"{config.teacher} ({folder.name})"
    model, tok, task = st.load_model(config.teacher, bundle.task, device=ctx.device)
    return model, tok, task, config.teacher


def load_student(bundle: ModelBundle, config: Distill, teacher: Any, t_tok: Any, t_task: str,
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
        keep = config.keep_layers or st.every_kth(layer_count(teacher.config), config.keep_every)
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


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Pair:
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


def load_pair(bundle: ModelBundle, config: Distill, ctx: RunContext) -> Pair:
    teacher, t_tok, t_task, teacher_desc = load_teacher(bundle, config, ctx)
    student, s_tok, kept, student_desc = load_student(bundle, config, teacher, t_tok, t_task, ctx)
    incoming = student is bundle.model
    problems = compat.compatibility_problems(teacher.config, t_tok, t_task, student.config, s_tok, t_task
                                             if not incoming else bundle.task)
    problems += matching_problems(config, teacher.config, student.config)
    if problems:
        raise StageError("; ".join(problems))
    if student is teacher:
        raise StageError("teacher: the teacher and the student are the same model; name a student")
    return Pair(teacher, t_tok, t_task, teacher_desc, student, s_tok, kept, student_desc, incoming)
