"""Checks that a compressed model (compress's or llm-compressor's) is what its method promises, before
bench/bench_peer.py compares perplexities: the same layers touched, the sparsity or the N:M pattern
kept, and at most 2^bits levels in every quantization group."""

from __future__ import annotations

from typing import Any

import torch


def target_linears(dense_state: dict[str, torch.Tensor]) -> list[str]:
    """The decoder blocks' linear layers (what both tools prune or quantize: not embeddings, norms or head)."""
    return sorted(k[: -len(".weight")] for k, v in dense_state.items()
                  if k.endswith(".weight") and v.dim() == 2 and ".layers." in k)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of `m` consecutive inputs holding more than `n` non-zeros."""
    groups = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
    return int((groups > n).sum())


def max_levels(weight: torch.Tensor, group: int) -> int:
    """The most distinct values any group of `group` consecutive inputs of one row holds."""
    rows = weight.reshape(-1, group)
    ordered = rows.sort(dim=1).values
    return int(((ordered[:, 1:] != ordered[:, :-1]).sum(1) + 1).max())


def check_output(model: Any, label: str, stage: dict[str, Any], dense_state: dict[str, torch.Tensor],
                 changed: set[str] | None = None) -> dict[str, Any]:
    """Facts about `model`'s target layers; ValueError naming the layer when one breaks the method's promise.

    `changed` (llm-compressor's saved weight names) must cover every target layer, so both tools are
    compared on the same layers."""
    names = target_linears(dense_state)
    if changed is not None and (missing := [n for n in names if f"{n}.weight" not in changed]):
        raise ValueError(f"{label}: llm-compressor's output lacks {len(missing)} target layers, e.g. {missing[0]}")
    touched = worst_levels = 0
    zeros: dict[int, int] = {}  # by decoder block (`.layers.N.`): OWL's allocation is read back from these
    total: dict[int, int] = {}
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight.detach().float()
            dense = dense_state[f"{name}.weight"].float()
            touched += int(not torch.equal(weight, dense))
            block = int(name.split(".layers.")[1].split(".")[0])
            zeros[block] = zeros.get(block, 0) + int((weight == 0).sum())
            total[block] = total.get(block, 0) + weight.numel()
            if stage["type"] == "prune":
                if stage.get("structure") == "n:m":
                    n, m = (int(x) for x in stage["pattern"].split(":"))
                    if bad := nm_violations(weight, n, m):
                        raise ValueError(f"{label}: {name} has {bad} groups of {m} with more than {n} non-zeros")
                elif stage.get("allocation") == "owl":
                    pass  # OWL varies the sparsity by block on purpose: checked overall, below
                elif (share := float((weight == 0).float().mean())) < stage["sparsity"] - 0.01:
                    raise ValueError(f"{label}: {name} is {share:.4f} sparse, not {stage['sparsity']}")
            else:
                levels = max_levels(weight, stage["group_size"])
                worst_levels = max(worst_levels, levels)
                if levels > 2 ** stage["bits"]:
                    raise ValueError(f"{label}: {name} has a group with {levels} distinct values, more than "
                                     f"2^{stage['bits']}")
    overall = sum(zeros.values()) / sum(total.values())
    if stage.get("allocation") == "owl" and abs(overall - stage["sparsity"]) > 0.01:
        raise ValueError(f"{label}: the target layers are {overall:.4f} sparse overall, not {stage['sparsity']}")
    if touched != len(names):
        raise ValueError(f"{label}: {len(names) - touched} of {len(names)} target layers are unchanged")
    facts: dict[str, Any] = {"target_layers": len(names), "sparsity": round(overall, 6)}
    if stage.get("allocation") == "owl":  # what OWL decided: each decoder block's sparsity
        facts["block_sparsity"] = [round(zeros[b] / total[b], 4) for b in sorted(total)]
    if stage["type"] != "prune":
        facts["max_levels_per_group"] = worst_levels
    return facts
