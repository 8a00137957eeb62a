"""Low-rank stage: truncated SVD of chosen linear layers, W (out x in) ~ B (out x r) @ A (r x in),
each replaced by two smaller linears. GPT-2's Conv1D is factorised as the linear it is (its weight
is stored transposed), Falcon's FalconLinear like any linear. Saved as a `lowrank` bundle format:
the config, the in-memory state dict under its own names (transformers 5 renames some keys on
`save_pretrained`, e.g. GPT-NeoX's lm_head to `embed_out`, which a plain state-dict load then
missed) and the map of factorised layers."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.bundle import ModelBundle, ModelFormat, auto_class, register_format
from compress.context import RunContext
from compress.errors import ModelError, StageError
from compress.layers import bad_patterns, ignore_field, pattern_problems, targets_field
from compress.pruning.targets import oriented, select_linears
from compress.registry import StageConfig, StageResult, register_stage

LOWRANK_FILE = "lowrank.json"
WEIGHTS = "model.safetensors"


class LowRankLinear(torch.nn.Module):
    """`second(first(x))`: a rank-r stand-in for a Linear(in, out). Keeps the bias on `second`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = torch.nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = torch.nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class LowRank(StageConfig):
    """Factorise linear layers by truncated SVD to a fixed rank or to an energy threshold."""

    type: Literal["lowrank"] = "lowrank"
    rank: int | None = Field(None, gt=0, description="Rank r kept in every targeted layer.")
    energy: float | None = Field(None, gt=0, le=1, description="Instead of rank: keep the smallest rank "
                                 "whose singular values hold this share of the squared Frobenius norm "
                                 "(e.g. 0.9).")
    targets: list[str] | None = targets_field("factorise")
    ignore: list[str] | None = ignore_field("factorised")
    skip_if_larger: bool = Field(True, description="Leave a layer dense when r * (in + out) >= in * out, "
                                 "i.e. when the two factors would not be smaller than the original.")
    latency_tokens: int = Field(2048, gt=0, description="Tokens in the per-layer latency probe.")

    @model_validator(mode="after")
    def _one_target(self) -> LowRank:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("rank: give exactly one of rank (e.g. 32) or energy (e.g. 0.9)")
        bad = bad_patterns(self.targets) + bad_patterns(self.ignore)
        if bad:
            raise ValueError(f"targets: invalid regular expression {', '.join(bad)}")
        return self


def _select(model: Any, config: LowRank) -> dict[str, torch.nn.Module]:
    return select_linears(model, config.targets, config.ignore, conv1d=True)


def check_lowrank(bundle: ModelBundle, config: LowRank, ctx: RunContext) -> list[str]:
    unmatched = pattern_problems(bundle.model, {"targets": config.targets, "ignore": config.ignore})
    linears = _select(bundle.model, config)
    if unmatched or not linears:
        every = select_linears(bundle.model, [".*"], None, conv1d=True)
        names = sorted({n.rsplit(".", 1)[-1] for n in every})
    if unmatched:
        return [f"{p}; factorisable layers here: {', '.join(names) or 'none'}" for p in unmatched]
    if not linears:
        chosen = f"targets {config.targets}" if config.targets is not None else "all layers"
        dropped = f"ignore {config.ignore}" if config.ignore else "the heads and embeddings"
        rule = f"{chosen} minus {dropped}"
        return [(f"targets: no layer is left to factorise by {rule}; factorisable layers here: "
                 f"{', '.join(names) or 'none'}")]
    if config.rank is not None:
        bad = [(n, min(oriented(m).shape)) for n, m in linears.items() if config.rank > min(oriented(m).shape)]
        if bad:
            name, limit = min(bad, key=lambda b: b[1])
            others = f" and {len(bad) - 1} other layer(s)" if len(bad) > 1 else ""
            return [(f"rank: {config.rank} is larger than min(in, out) = {limit} of {name}{others}; "
                     f"use rank <= {limit}, an energy threshold, or ignore those layers")]
    return []


def _median_ms(fn, x: torch.Tensor, repeats: int = 15) -> float:
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            start = time.perf_counter()
            fn(x)
            if i >= 3:  # first calls warm caches and allocator
                times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 4)


def _replace(model: Any, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def factorize(linear: torch.nn.Module, rank: int | None, energy: float | None) -> tuple[LowRankLinear, float]:
    """The SVD factors of `linear` (a linear or Conv1D layer) at `rank` (or at the energy threshold)
    and the energy kept."""
    weight = oriented(linear).detach().float()
    out_features, in_features = weight.shape
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    share = (s * s).cumsum(0) / (s * s).sum()
    r = rank if rank is not None else int((share < energy - 1e-7).sum()) + 1
    r = min(r, len(s))
    root = s[:r].sqrt()  # split sqrt(S) across both factors so neither carries all the scale
    lr = LowRankLinear(in_features, out_features, r, linear.bias is not None,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        lr.first.weight.copy_(root[:, None] * vh[:r])
        lr.second.weight.copy_(u[:, :r] * root[None, :])
        if linear.bias is not None:
            lr.second.bias.copy_(linear.bias.detach())
    return lr, float(share[r - 1])


# Allowed gap between the factorised layer's error and the Eckart-Young optimum sqrt(1 - energy kept):
# both come from one float32 SVD, so they agree to ~1e-6; a misoriented or mis-scaled factor is off
# by 0.1 or more.
OPTIMALITY_TOLERANCE = 1e-3


def check_factors(name: str, original: torch.nn.Module, replaced: torch.nn.Module, kept: float) -> float:
    """The promise: the layer now in the model is the best rank-r approximation of the original,
    compared through both modules' own forwards (so Conv1D's transposed weight is covered): its
    relative error ||W_r - W|| / ||W|| must equal sqrt(1 - energy kept). Returns that error."""
    n_in = replaced.in_features
    eye = torch.eye(n_in, device=original.weight.device, dtype=original.weight.dtype)
    with torch.no_grad():
        dense, low = original(eye).float(), replaced(eye).float()  # rows: W^T (+ bias on both)
        bias = original.bias.detach().float() if original.bias is not None else 0.0
        err = float((low - dense).norm() / (dense - bias).norm())
    expected = max(0.0, 1.0 - kept) ** 0.5
    # bf16 / fp16 layers: both forwards round to the dtype, so the comparison is only that exact.
    tol = max(OPTIMALITY_TOLERANCE, 16 * torch.finfo(original.weight.dtype).eps)
    if not abs(err - expected) <= tol * (1 + expected):
        raise StageError(f"lowrank: layer {name}: the factorised layer differs from the original by {err:.4g} "
                         f"(relative), but keeping {kept:.4%} of the energy should leave exactly "
                         f"{expected:.4g}; the factors do not reproduce the layer")
    return err


def run_lowrank(bundle: ModelBundle, config: LowRank, ctx: RunContext) -> StageResult:
    problems = check_lowrank(bundle, config, ctx)
    if problems:
        raise StageError("lowrank." + "; lowrank.".join(problems))
    model = bundle.model
    rows, skipped = [], []
    for name, linear in _select(model, config).items():
        new, kept = factorize(linear, config.rank, config.energy)
        before = linear.weight.numel()
        after = new.first.weight.numel() + new.second.weight.numel()
        if config.skip_if_larger and after >= before:
            skipped.append(name)
            continue
        probe = torch.randn(config.latency_tokens, new.in_features, device=linear.weight.device,
                            dtype=linear.weight.dtype)
        rows.append({"layer": name, "shape": [new.out_features, new.in_features], "rank": new.rank,
                     "energy_kept": round(kept, 5), "params_before": before, "params_after": after,
                     "latency_before_ms": _median_ms(linear, probe),
                     "latency_after_ms": _median_ms(new, probe)})
        _replace(model, name, new)
        rows[-1]["relative_error"] = round(check_factors(name, linear, model.get_submodule(name), kept), 6)
    if not rows:
        raise StageError("lowrank.rank: no layer gets smaller at this rank/energy (r * (in + out) >= "
                         "in * out everywhere); lower rank or energy, or set skip_if_larger: false")
    # A factorised weight is dense: masks on the replaced weights no longer describe anything.
    masks = {k: v for k, v in bundle.masks.items() if k.rsplit(".", 1)[0] not in {r["layer"] for r in rows}}
    out = bundle.replace(model=model, format="lowrank", masks=masks)
    p0, p1 = sum(r["params_before"] for r in rows), sum(r["params_after"] for r in rows)
    t0, t1 = sum(r["latency_before_ms"] for r in rows), sum(r["latency_after_ms"] for r in rows)
    facts = {"layers_factorized": len(rows), "layers_skipped": len(skipped),
             "factorized_params_before": p0, "factorized_params_after": p1,
             "factorized_params_ratio": round(p1 / p0, 4),
             "layer_latency_ms_before": round(t0, 4), "layer_latency_ms_after": round(t1, 4),
             "latency_probe": (f"{config.latency_tokens} tokens per layer, median of 15, "
                               f"{torch.get_num_threads()} threads"),
             "mean_energy_kept": round(sum(r["energy_kept"] for r in rows) / len(rows), 5),
             "max_relative_error": max(r["relative_error"] for r in rows),
             "masks_dropped": len(bundle.masks) - len(masks)}
    out.record("lowrank", config.model_dump(mode="json"), **facts,
               ranks={r["layer"]: r["rank"] for r in rows}, skipped=skipped)
    return StageResult(out, {**facts, "layers": rows, "skipped": skipped})


# ---------------------------------------------------------------------------- format


def _save(bundle: ModelBundle, folder: Path) -> None:
    from safetensors.torch import save_model

    model = bundle.model
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    # save_model (not save_file) drops the duplicates of tied tensors, which safetensors refuses.
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    layers = {name: {"in": m.in_features, "out": m.out_features, "rank": m.rank,
                     "bias": m.second.bias is not None}
              for name, m in bundle.model.named_modules() if isinstance(m, LowRankLinear)}
    (folder / LOWRANK_FILE).write_text(json.dumps({"schema": 1, "layers": layers}, indent=1))


def _load(folder: Path, meta: dict[str, Any]) -> Any:
    from safetensors.torch import load_model

    from compress.portable import read_config
    from compress.quant.format import is_tied

    spec = json.loads((folder / LOWRANK_FILE).read_text())
    config = read_config(folder)
    model = auto_class(meta["task"]).from_config(config)
    for name, layer in spec["layers"].items():
        _replace(model, name, LowRankLinear(layer["in"], layer["out"], layer["rank"], layer["bias"],
                                            dtype=model.dtype))
    missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
    # Tied duplicates are dropped on save; they share storage with a tensor that was loaded.
    missing = [k for k in missing if not is_tied(model, k)]
    if missing or unexpected:
        raise ModelError(f"{folder}: low-rank checkpoint does not match its model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    return model


register_format(ModelFormat("lowrank", _save, _load, plain_loadable=False))
register_stage(LowRank, run_lowrank, check=check_lowrank)
