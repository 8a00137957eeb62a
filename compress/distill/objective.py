"""The distillation objective as a `loss_fn(model, batch)` for the shared training loop.

The student is trained inside a small wrapper module that also owns the learned projections used
for hidden-state matching, so the loop's optimizer, DDP and checkpoints see one model with every
trainable tensor. The teacher stays outside it: frozen, in eval mode, under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compress.distill import losses
from compress.distill.cache import TeacherCache


class StudentWithProjections(torch.nn.Module):
    """The student plus one linear map per matched layer when its hidden size differs from the teacher's."""

    def __init__(self, student: Any, layer_map: dict[int, int], student_dim: int, teacher_dim: int,
                 with_projections: bool):
        super().__init__()
        self.student = student
        self.layer_map = dict(layer_map)
        self.proj = torch.nn.ModuleDict()
        if with_projections and student_dim != teacher_dim:
            for s in self.layer_map:
                self.proj[str(s)] = torch.nn.Linear(student_dim, teacher_dim).to(
                    next(student.parameters()).device)

    def forward(self, hidden: bool = False, attentions: bool = False, **batch: Any):
        out = self.student(**batch, output_hidden_states=hidden, output_attentions=attentions)
        matched = {}
        if hidden:
            for s in self.layer_map:
                h = out.hidden_states[s]
                matched[s] = self.proj[str(s)](h) if str(s) in self.proj else h
        return out, matched

    # The loop turns gradient checkpointing on and off through these when the model has them.
    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.student.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.student.gradient_checkpointing_disable()


@dataclass
class Objective:
    """α·CE + (1−α)·τ²·KL + hidden_weight·hidden + attention_weight·attention, with running parts."""

    teacher: Any
    task: str
    vocab: int
    alpha: float
    temperature: float
    direction: str
    hidden_kind: str
    hidden_weight: float
    attention_weight: float
    layer_map: dict[int, int]
    cache: TeacherCache | None = None

    def __post_init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.count = 0

    def _teacher(self, inputs: dict[str, torch.Tensor], hidden: bool, attentions: bool):
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return self.teacher(**inputs, output_hidden_states=hidden, output_attentions=attentions)

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = dict(batch)
        index = batch.pop("example_index", None)
        hidden = self.hidden_kind != "none" and self.hidden_weight > 0
        attn = self.attention_weight > 0
        out, matched = model(hidden=hidden, attentions=attn, **batch)
        loss = torch.zeros((), device=out.logits.device)
        parts: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            parts["ce"] = out.loss
            loss = loss + self.alpha * out.loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        soft_needed = self.alpha < 1
        t_out = None
        if (soft_needed and self.cache is None) or hidden or attn:
            t_out = self._teacher(inputs, hidden, attn)
        if soft_needed:
            s_logits = out.logits[..., : self.vocab]
            s_rows, mask = losses.position_mask(self.task, batch, s_logits)
            if self.cache is not None:
                idx, logp = self.cache.lookup(index, s_logits.shape[1] if s_logits.dim() == 3 else None)
                idx, logp = idx.to(s_rows.device), logp.to(s_rows.device)
                if self.task != "sequence-classification":
                    idx, logp = idx[:, :-1][mask], logp[:, :-1][mask]
                kl = losses.kl_topk(s_rows, idx, logp, self.temperature, self.direction)
            else:
                t_rows, _ = losses.position_mask(self.task, batch, t_out.logits[..., : self.vocab])
                kl = losses.kl_dense(s_rows, t_rows, self.temperature, self.direction)
            parts["kl"] = kl
            loss = loss + (1 - self.alpha) * self.temperature**2 * kl
        token_mask = batch["attention_mask"].bool() if "attention_mask" in batch else \
            torch.ones_like(batch["input_ids"], dtype=torch.bool)
        if hidden:
            h = sum(losses.hidden_loss(matched[s], t_out.hidden_states[t], token_mask, self.hidden_kind)
                    for s, t in self.layer_map.items()) / len(self.layer_map)
            parts["hidden"] = h
            loss = loss + self.hidden_weight * h
        if attn:
            pairs = [(s, t) for s, t in self.layer_map.items() if s > 0 and t > 0]
            a = sum(losses.attention_loss(out.attentions[s - 1], t_out.attentions[t - 1], token_mask)
                    for s, t in pairs) / max(len(pairs), 1)
            parts["attention"] = a
            loss = loss + self.attention_weight * a
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + float(value.detach())
        self.count += 1
        return loss

    def mean_parts(self) -> dict[str, float]:
        return {f"mean_{k}_loss": round(v / max(self.count, 1), 5) for k, v in self.parts.items()}
