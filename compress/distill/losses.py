"""Distillation losses: soft-target KL (dense or from a top-k cache), hidden-state and attention matching.

Written by hand because none of the maintained libraries we depend on ships them in a form that
takes a top-k teacher cache, padding-row trimming and a layer map together (transformers' and
torchtune's KD losses are forward-KL on dense logits only); each function is a few lines of tensor
arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def position_mask(task: str, batch: dict[str, torch.Tensor],
                  logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that carry a prediction, flattened to [N, V], and the mask used to pick them.

    Classification: one row per example. Causal LM: the logit at position t predicts token t+1, so
    only positions whose next label is real (not -100, not padding) count, as in the CE loss.
    """
    if task == "sequence-classification":
        return logits, torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    labels = batch.get("labels")
    if labels is not None:
        mask = labels[:, 1:] != -100
    else:
        mask = batch["attention_mask"][:, 1:].bool()
    return logits[:, :-1][mask], mask


def kl_dense(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
             direction: str) -> torch.Tensor:
    """KL between softened distributions, summed over classes, averaged over rows.

    forward: KL(teacher || student) (mass-covering); reverse: KL(student || teacher) (mode-seeking,
    often preferred for generative students).
    """
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if direction == "reverse":
        log_s, log_t = log_t, log_s
    # F.kl_div(input=log q, target=log p, log_target) computes sum p (log p - log q).
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) / max(student.shape[0], 1)


def kl_topk(student: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor, temperature: float,
            direction: str) -> torch.Tensor:
    """KL against a teacher known only by its top-k log-probabilities (at `temperature`).

    The teacher's remaining mass is spread evenly over the other tokens, which makes it a proper
    distribution over the whole vocabulary, so both KL directions stay finite; the sums over the
    tail are taken in closed form instead of materialising a dense teacher.
    """
    vocab = student.shape[-1]
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    top_logp = top_logp.float()
    log_q_top = log_q.gather(-1, top_idx.long())
    p_top = top_logp.exp()
    rest = vocab - top_idx.shape[-1]
    tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    if direction == "forward":
        kl = (p_top * (top_logp - log_q_top)).sum(-1)
        if rest > 0:
            log_u = torch.log(tail.clamp_min(1e-12)) - math.log(rest)
            sum_tail_log_q = log_q.sum(-1) - log_q_top.sum(-1)
            kl = kl + tail * log_u - (tail / rest) * sum_tail_log_q
    else:
        q = log_q.exp()
        q_top = log_q_top.exp()
        kl = (q * log_q).sum(-1) - (q_top * top_logp).sum(-1)
        if rest > 0:
            log_u = torch.log(tail.clamp_min(1e-12)) - math.log(rest)
            kl = kl - log_u * (1.0 - q_top.sum(-1))
    return kl.sum() / max(student.shape[0], 1)


def topk_log_probs(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely classes/tokens and their log-probabilities at `temperature`."""
    logp = F.log_softmax(teacher.float() / temperature, dim=-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return indices, values


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """MSE or (1 - cosine) between hidden states [B, T, D], over real (unpadded) tokens."""
    s, t = student.float()[mask], teacher.float()[mask]
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher attention || student attention) per query row, as in MiniLM's attention transfer.

    Attention maps are [B, H, T, T] probability rows; padded query rows are left out.
    """
    log_s = torch.log(student.float().clamp_min(1e-12))
    log_t = torch.log(teacher.float().clamp_min(1e-12))
    per_row = (teacher.float() * (log_t - log_s)).sum(-1)  # [B, H, T]
    rows = mask[:, None, :].expand_as(per_row)
    return per_row[rows].mean()
