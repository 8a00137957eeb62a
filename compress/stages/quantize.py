"""Quantize stage: bitsandbytes int8/nf4/fp4, CPU int8-dynamic, int8/int4 weight-only, GPTQ, AWQ, embeddings.

Each scheme is a small config with its own handler in compress/quant/schemes/ (registered in
`QUANTIZE_SCHEMES`, compress/quant/config.py); this module only checks the config against the model,
picks layers, dispatches to the scheme, quantizes embeddings, checks the result and reports sizes.
bitsandbytes results are standard transformers checkpoints (`from_pretrained` reloads them); the
others use compress's `quantized` format.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.errors import StageError
from compress.quant import bnb as bnb_quant
from compress.quant import format as qformat
from compress.quant import schemes  # noqa: F401  (registers every scheme)
from compress.quant.accounting import quantized_modules, size_summary
from compress.quant.config import CPU_ALTERNATIVE, QUANTIZE_SCHEMES, Quantize
from compress.quant.embedding import QuantEmbedding, TiedQuantHead
from compress.quant.kinds import is_own_layer
from compress.quant.select import linear_kind, select_layers, unmatched_patterns
from compress.quant.verify import check_embedding, check_layers, check_tied
from compress.quant.weight_only import group_problem
from compress.registry import StageResult, register_stage

__all__ = ["QUANTIZE_SCHEMES", "Quantize", "check_quantize", "run_quantize"]


# ---------------------------------------------------------------------------- checks


def _selection(model: nn.Module, config: Quantize):
    skip_types = tuple(type(m) for m in quantized_modules(model).values())
    return select_layers(model, config.include, config.exclude, config.module_types, config.quantize_head,
                         config.embeddings != "none", skip_types=skip_types)


def _as_scheme(config: Quantize) -> Quantize:
    """The scheme's own config (a bare `Quantize()` built without keywords is the base class)."""
    return config if type(config) is not Quantize else Quantize(**config.model_dump(exclude_unset=True),
                                                                 scheme=config.scheme)


def check_quantize(bundle: ModelBundle, config: Quantize, ctx: RunContext) -> list[str]:
    config = _as_scheme(config)
    model = bundle.model
    problems = []
    has_bnb = any(isinstance(m, bnb_quant.bnb_layer_types()) for m in model.modules())
    has_own = bundle.format == qformat.FORMAT or any(is_own_layer(m) for m in model.modules())
    if config.bitsandbytes and (has_own or has_bnb):
        problems.append(f"scheme: {config.scheme} (bitsandbytes) needs an unquantized model, but this one is "
                        f"already quantized; use one quantize stage, or a non-bitsandbytes scheme")
    elif has_bnb:
        problems.append(f"scheme: the model holds bitsandbytes layers, which {config.scheme} cannot be "
                        f"combined with; quantize in one stage")
    problems += config.scheme_problems(bundle, ctx)
    if config.uses_calibration() and ctx.data is None:
        problems.append("calibration_samples: this scheme calibrates on the recipe's data, but the recipe "
                        "has no data section; add one")
    for field in ("include", "exclude"):
        missing = unmatched_patterns(model, getattr(config, field) or [])
        if missing:
            some = [n for n, m in model.named_modules()
                    if linear_kind(m) is not None or isinstance(m, nn.Embedding)][:4]
            problems.append(f"{field}: {missing} match no layer; layer names look like {', '.join(some)}")
    present = set().union(*({t.__name__ for t in type(m).__mro__} for m in model.modules()))
    unknown = [t for t in config.module_types if t not in present]
    if unknown:
        problems.append(f"module_types: {unknown} are not in this model; linear layers are 'Linear'")
    sel = _selection(model, config)
    if not sel.linear and not sel.embeddings:
        problems.append("include: no layer is selected; loosen include/exclude or module_types")
    tied = _tied_embedding(model)
    if tied and tied[1] in sel.linear and tied[0] not in sel.embeddings:
        problems.append(f"quantize_head: {tied[1]} shares its weight with {tied[0]} (tied embeddings); "
                        f"quantizing the head alone would store the table twice. Set embeddings: int8 "
                        f"(the shared table is quantized once) or quantize_head: false")
    if config.on_unsupported == "error" and not config.bitsandbytes:
        for name in sel.linear:
            why = config.layer_problem(model.get_submodule(name), ctx.device)
            if why:
                problems.append(f"scheme: layer {name}: {why}; or exclude it (exclude: ['{name}']) or set "
                                f"on_unsupported: skip")
    return problems


# ---------------------------------------------------------------------------- run


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    qformat.set_module(model, name, module)


def _tied_embedding(model: nn.Module) -> tuple[str, str] | None:
    """(embedding name, head name) when the output head shares the input embedding's table."""
    if not hasattr(model, "get_output_embeddings"):
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb is None or getattr(head, "weight", None) is not emb.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(emb)], names[id(head)]


def _quantize_embeddings(model: nn.Module, names: list[str], config: Quantize,
                         skipped: list[dict[str, str]]) -> tuple[list[str], dict[str, Any]]:
    """Swap in quantized tables, each checked against the float lookup; a tied head keeps reading its
    table. Returns the names replaced and facts for the report."""
    bits, group = (8 if config.embeddings == "int8" else 4), config.resolved_embedding_group()
    tied = _tied_embedding(model)
    done, errors, facts = [], {}, {}
    for name in names:
        emb = model.get_submodule(name)
        why = group_problem(emb.embedding_dim, bits, group)
        if why:
            if config.on_unsupported == "error":
                raise StageError(f"quantize.embeddings: cannot quantize {name}: {why}; set "
                                 f"embedding_group_size, exclude it, or set on_unsupported: skip")
            skipped.append({"layer": name, "reason": why})
            continue
        new = QuantEmbedding.from_embedding(emb, bits, group)
        _swap(model, name, new)
        errors[name] = check_embedding(name, emb, model.get_submodule(name), config.embeddings)
        if tied and tied[0] == name:
            head = model.get_submodule(tied[1])
            _swap(model, tied[1], TiedQuantHead(new, name, getattr(head, "bias", None) is not None))
            if getattr(head, "bias", None) is not None:
                model.get_submodule(tied[1]).bias.data.copy_(head.bias.detach().float())
            check_tied(model, name, emb.weight)
            facts["tied_head"] = f"{tied[1]} reads {name}'s {config.embeddings} table (tied, stored once)"
        done.append(name)
    if errors:
        facts["embedding_output_error_max"] = round(max(errors.values()), 5)
    return done, facts


def run_quantize(bundle: ModelBundle, config: Quantize, ctx: RunContext) -> StageResult:
    config = _as_scheme(config)
    started = time.perf_counter()
    model = bundle.model
    model.eval()
    sel = _selection(model, config)
    skipped: list[dict[str, str]] = []
    targets = []
    for name in sel.linear:
        layer = model.get_submodule(name)
        why = config.layer_problem(layer, ctx.device)
        if why is None:
            targets.append(name)
            continue
        if config.on_unsupported == "error":
            raise StageError(f"quantize.scheme: {config.scheme} cannot quantize layer {name} "
                             f"({type(layer).__name__} {tuple(layer.weight.shape)}): "
                             f"{why}; exclude it (exclude: ['{name}']), set on_unsupported: skip, or use "
                             f"scheme {CPU_ALTERNATIVE}")
        skipped.append({"layer": name, "reason": why})
        ctx.logger.warning("quantize: skipped %s (%s)", name, why)

    tied = _tied_embedding(model)
    if tied and tied[1] in targets and tied[0] not in sel.embeddings:
        raise StageError(f"quantize.quantize_head: {tied[1]} is tied to {tied[0]}; quantizing it alone would "
                         f"store the table twice; set embeddings: int8 or quantize_head: false")
    if tied and tied[0] in sel.embeddings and tied[1] in targets:
        targets.remove(tied[1])  # the head is the table: quantized once, with the embedding
    embedded: list[str] = []
    done = QUANTIZE_SCHEMES.handler(config)(model, targets, config, bundle, ctx)
    model, errors, facts, fmt = done.model, done.errors, dict(done.facts), done.format
    if done.kept_float:  # chosen by the scheme (mixed precision), reported, not expected quantized
        targets = [t for t in targets if t not in set(done.kept_float)]
        facts["kept_float"] = list(done.kept_float)
    if not config.bitsandbytes:
        with torch.no_grad():
            embedded, emb_facts = _quantize_embeddings(model, sel.embeddings, config, skipped)
        facts.update(emb_facts)
    selected = len(sel.linear) + len(sel.embeddings)
    facts.update(check_layers(model, config.scheme, targets, errors, embedded, selected, config.error_bound()))
    sizes = size_summary(model)
    for row in sizes["layers"]:
        if row["layer"] in errors:
            row["relative_error"] = round(errors[row["layer"]], 5)
    summary = sizes["summary"]
    info: dict[str, Any] = {
        "scheme": config.scheme,
        **{k: v for k, v in summary.items()},
        "skipped_unsupported": len(skipped),
        "head_kept_float": ", ".join(h for h in sel.skipped_head if "tied_head" not in facts) or "none",
        "embeddings_kept_float": {n: why for n, why in sel.embeddings_kept.items()} or "none",
        "seconds": round(time.perf_counter() - started, 3),
        **facts,
        "layers": sizes["layers"],
        "skipped": skipped,
    }
    out = bundle.replace(model=model, format=fmt)
    out.record("quantize", config.model_dump(mode="json"), **{k: v for k, v in info.items() if k != "layers"})
    return StageResult(out, info)


register_stage(Quantize, run_quantize, check=check_quantize)
