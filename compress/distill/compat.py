"""Teacher/student compatibility, checked before any training: vocabulary, task and labels.

Both models read the same input ids and their output distributions are compared class by class
(token by token for a causal LM), so the tokenizers must agree id for id. Extra embedding rows that
models carry as padding (vocab_size rounded up to a multiple of 64, say) are fine: the losses only
compare the first `len(tokenizer)` logits.
"""

from __future__ import annotations

from typing import Any


def _vocab(tokenizer: Any) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def _generic_labels(id2label: dict | None) -> bool:
    return not id2label or all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def compatibility_problems(teacher_config: Any, teacher_tokenizer: Any, teacher_task: str,
                           student_config: Any, student_tokenizer: Any, student_task: str,
                           field: str = "teacher") -> list[str]:
    """Problems ("field: what; fix") that make distilling this teacher into this student meaningless."""
    problems: list[str] = []
    if teacher_task != student_task:
        problems.append(f"{field}: the teacher is a {teacher_task} model but the student is {student_task}; "
                        f"distil between models of the same task")
        return problems
    if teacher_task == "sequence-classification":
        t_labels, s_labels = teacher_config.num_labels, student_config.num_labels
        if t_labels != s_labels:
            problems.append(f"{field}: the teacher predicts {t_labels} labels but the student {s_labels}; "
                            f"give a student with the teacher's {t_labels} labels")
        else:
            t_names = getattr(teacher_config, "id2label", None)
            s_names = getattr(student_config, "id2label", None)
            if not _generic_labels(t_names) and not _generic_labels(s_names):
                t_norm = {int(k): v for k, v in t_names.items()}
                s_norm = {int(k): v for k, v in s_names.items()}
                if t_norm != s_norm:
                    diff = next(k for k in sorted(t_norm) if t_norm[k] != s_norm.get(k))
                    problems.append(f"{field}: label {diff} is {t_norm[diff]!r} for the teacher but "
                                    f"{s_norm.get(diff)!r} for the student; use a student with the same "
                                    f"label order ({list(t_norm.values())})")
    problems += vocabulary_problems(teacher_config, teacher_tokenizer, student_config, student_tokenizer,
                                    field)
    return problems


def vocabulary_problems(teacher_config: Any, teacher_tokenizer: Any, student_config: Any,
                        student_tokenizer: Any, field: str = "teacher") -> list[str]:
    problems: list[str] = []
    if teacher_tokenizer is not None and student_tokenizer is not None \
            and teacher_tokenizer is not student_tokenizer:
        t_vocab, s_vocab = _vocab(teacher_tokenizer), _vocab(student_tokenizer)
        if t_vocab != s_vocab:
            ids = sorted(set(t_vocab) | set(s_vocab))
            bad = [i for i in ids if t_vocab.get(i) != s_vocab.get(i)]
            shown = ", ".join(f"id {i} is {t_vocab.get(i)!r} for the teacher and {s_vocab.get(i)!r} for the "
                              f"student" for i in bad[:3])
            problems.append(f"{field}: the teacher and student vocabularies differ ({len(t_vocab)} vs "
                            f"{len(s_vocab)} tokens, {len(bad)} ids differ: {shown}); distillation needs "
                            f"both models to share one tokenizer")
    tokens = len(student_tokenizer) if student_tokenizer is not None else None
    for who, config in (("teacher", teacher_config), ("student", student_config)):
        rows = getattr(config, "vocab_size", None)
        if tokens is not None and rows is not None and rows < tokens:
            problems.append(f"{field}: the {who} has {rows} embedding rows but the tokenizer has {tokens} "
                            f"tokens, so ids from {rows} up have no embedding; resize its embeddings")
    return problems
