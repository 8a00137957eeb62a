"""Teacher outputs cached to disk as top-k log-probabilities, computed once and reused every epoch.

The file lives in the stage's work folder (safetensors, written to a temporary name then renamed)
and is named by a fingerprint of what produced it, so a resumed stage reuses it and a changed
setting never reads a stale one. With several processes a file lock lets one compute it while the
others wait and then read it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from compress.distill.losses import topk_log_probs


class TeacherCache:
    """Top-k indices [N, (T,) k] (int32) and log-probabilities (float32) per training example."""

    def __init__(self, indices: torch.Tensor, logp: torch.Tensor, path: Path | None = None):
        self.indices, self.logp, self.path = indices, logp, path

    def lookup(self, example_index: torch.Tensor,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = example_index.cpu().long()
        idx, logp = self.indices[rows], self.logp[rows]
        if width is not None and idx.dim() == 3:
            idx, logp = idx[:, :width], logp[:, :width]
        return idx, logp


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


@torch.inference_mode()
def _compute(teacher: Any, dataset: Any, collate: Any, k: int, temperature: float, vocab: int,
             device: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher.eval()
    all_idx, all_logp, width = [], [], 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch = {key: v.to(device) for key, v in batch.items() if key not in ("labels", "example_index")}
        logits = teacher(**batch).logits[..., :vocab]
        idx, logp = topk_log_probs(logits, k, temperature)
        all_idx.append(idx.to(torch.int32).cpu())
        all_logp.append(logp.cpu())
        width = max(width, idx.shape[1]) if idx.dim() == 3 else 0
    if width:  # causal LM: pad every batch to the longest sequence (padded positions are never read)
        all_idx = [torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1])) for x in all_idx]
        all_logp = [torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1])) for x in all_logp]
    return torch.cat(all_idx), torch.cat(all_logp)


def build_cache(teacher: Any, dataset: Any, collate: Any, *, k: int, temperature: float, vocab: int,
                device: str, folder: Path, key: str, batch_size: int = 64) -> TeacherCache:
    """Load the cache named `key` from `folder`, or compute and write it."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"teacher-top{k}-{key}.safetensors"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            tensors = load_file(str(path))
            return TeacherCache(tensors["indices"], tensors["logp"], path)
        indices, logp = _compute(teacher, dataset, collate, k, temperature, vocab, device, batch_size)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"indices": indices.contiguous(), "logp": logp.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return TeacherCache(indices, logp, path)
