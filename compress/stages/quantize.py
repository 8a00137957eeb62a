"""Quantize stage: bitsandbytes int8/nf4/fp4, CPU int8-dynamic, int8/int4 weight-only, GPTQ, embeddings.

The schemes live in `compress.quant` (one module per job); this module only validates the config,
picks layers, dispatches, and reports sizes. bitsandbytes results are standard transformers
checkpoints (`from_pretrained` reloads them); the others use compress's `quantized` format.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.bundle import ModelBundle
from compress.calibration import batch_rows, batch_tokens, calibration_batches, input_stats
from compress.context import RunContext
from compress.errors import StageError
from compress.quant import bnb as bnb_quant
from compress.quant import format as qformat
from compress.quant.accounting import quantized_modules, size_summary
from compress.quant.dynamic import DynamicInt8Linear, kernel_available, smoothing_factors
from compress.quant.embedding import QuantEmbedding, TiedQuantHead
from compress.quant.gptq import gptq_quantize
from compress.quant.kinds import is_own_layer
from compress.quant.select import (
    as_linear,
    bad_patterns,
    dense_weight,
    in_out,
    linear_kind,
    select_layers,
    unmatched_patterns,
)
from compress.quant.verify import check_embedding, check_layers, check_tied, weight_error
from compress.quant.weight_only import WeightOnlyLinear, group_problem
from compress.registry import StageConfig, StageResult, register_stage

Scheme = Literal["int8", "nf4", "fp4", "int8-dynamic", "int8-weight", "int4-weight", "gptq"]
CPU_ALTERNATIVE = "int8-dynamic (CPU speed) or int4-weight / gptq (4-bit size)"

# Fields that mean something only for some schemes; setting one elsewhere is a mistake worth naming.
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "double_quant": ("nf4", "fp4"),
    "compute_dtype": ("nf4", "fp4"),
    "int8_threshold": ("int8",),
    "smooth_alpha": ("int8-dynamic",),
    "activation_scales": ("int8-dynamic",),
    "group_size": ("int8-weight", "int4-weight", "gptq"),
    "gptq_damp": ("gptq",),
    "gptq_block_size": ("gptq",),
}


class Quantize(StageConfig):
    """Quantize linear layers (and optionally embeddings) to 8 or 4 bits; sizes reported per layer."""

    type: Literal["quantize"] = "quantize"
    scheme: Scheme = Field("int8-dynamic", description=(
        "int8 (bitsandbytes LLM.int8), nf4/fp4 (bitsandbytes 4-bit), int8-dynamic (int8 weights and "
        "run-time int8 activations: the CPU speed path), int8-weight/int4-weight (weight-only, "
        "round-to-nearest), gptq (calibrated 4-bit weight-only)."))
    include: list[str] | None = Field(None, description=(
        "Only layers whose name matches one of these regexes (matched against trailing dotted parts, "
        "e.g. 'query', 'layer\\.0\\..*'); default: all."))
    exclude: list[str] = Field(default_factory=list,
                               description="Skip layers whose name matches one of these regexes.")
    module_types: list[str] = Field(["Linear"], min_length=1, description=(
        "Layer classes to quantize (class or base-class names); only linear layers can be quantized "
        "(GPT-2's Conv1D, a linear with a transposed weight, counts as Linear)."))
    quantize_head: bool = Field(False, description=(
        "Also quantize the output head (lm_head, classifier); off because it is the most sensitive layer."))
    embeddings: Literal["none", "int8", "int4"] = Field("none", description=(
        "Quantize embedding tables too (about half of a small model such as MiniLM). A table tied to "
        "the output head is quantized once and the head reads it; embeddings with a forward of their "
        "own (OPT's learned positions) stay float."))
    embedding_group_size: int | None = Field(None, ge=0, description=(
        "Values per scale along the embedding dimension; 0 = one per row. Default: 0 for int8, 64 for int4."))
    group_size: int | None = Field(None, ge=0, description=(
        "Weights per scale/zero point along the input dimension; 0 = one per output channel. "
        "Default: 0 for int8-weight, 128 for int4-weight and gptq."))
    double_quant: bool = Field(True, description=(
        "nf4/fp4: quantize the block scales too (4.127 instead of 4.5 bits/weight)."))
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="nf4/fp4: dtype the 4-bit weights are dequantized to for the matmul.")
    int8_threshold: float = Field(6.0, ge=0, description=(
        "int8: LLM.int8 outlier threshold; activations above it use an fp16 matmul (0 = none)."))
    activation_scales: Literal["auto", "per-tensor", "per-token"] = Field("auto", description=(
        "int8-dynamic: one activation scale per tensor (fastest: fbgemm's own) or per token (robust to "
        "outlier tokens; its extra passes cost time on small CPUs). auto = per-token for causal LMs, "
        "whose outlier tokens wreck a shared scale (SmolLM2-135M: perplexity 78.7 fp32, 261.6 "
        "per-tensor, 86.2 per-token), per-tensor for classifiers."))
    smooth_alpha: float | None = Field(None, ge=0, le=1, description=(
        "int8-dynamic: SmoothQuant strength, moving activation outliers into weights using calibration "
        "data (0.5 is typical); unset = no smoothing, no calibration."))
    calibration_samples: int | None = Field(None, gt=0, description=(
        "gptq / smoothing: calibration blocks of data.max_length tokens, drawn with calibration_seed "
        "(one example per block for classification); default: data.calibration_samples."))
    calibration_seed: int | None = Field(None, description=(
        "Seed for drawing calibration examples; default: the stage seed."))
    gptq_damp: float = Field(0.01, gt=0, lt=1, description=(
        "gptq: damping added to the Hessian diagonal (share of its mean)."))
    gptq_block_size: int = Field(128, gt=0, description=(
        "gptq: columns updated together (lazy batch updates)."))
    on_unsupported: Literal["error", "skip"] = Field("error", description=(
        "A layer the scheme cannot handle here: stop with an error naming it, or skip it (kept in float, "
        "listed in the report)."))

    @model_validator(mode="after")
    def _consistent(self) -> Quantize:
        problems = []
        for field, schemes in _ONLY_FOR.items():
            if field in self.model_fields_set and self.scheme not in schemes:
                problems.append(f"{field} only applies to scheme {' / '.join(schemes)} (scheme is "
                                f"{self.scheme}); remove it")
        if self.embeddings != "none" and self.scheme in bnb_quant.BNB_SCHEMES:
            problems.append(f"embeddings: scheme {self.scheme} keeps embeddings in float (transformers' "
                            f"bitsandbytes format cannot hold them); use scheme int8-weight, int4-weight or "
                            f"gptq with embeddings, or set embeddings: none")
        if "embedding_group_size" in self.model_fields_set and self.embeddings == "none":
            problems.append("embedding_group_size needs embeddings: int8 or int4; "
                            "remove it or set embeddings")
        for field in ("include", "exclude"):
            bad = bad_patterns(getattr(self, field))
            if bad:
                problems.append(f"{field}: not a valid regular expression: {', '.join(bad)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolved_group_size(self) -> int:
        if self.group_size is not None:
            return self.group_size
        return 0 if self.scheme == "int8-weight" else 128

    def resolved_embedding_group(self) -> int:
        if self.embedding_group_size is not None:
            return self.embedding_group_size
        return 0 if self.embeddings == "int8" else 64

    def resolved_activation_scales(self, task: str) -> str:
        if self.activation_scales != "auto":
            return self.activation_scales
        return "per-token" if task == "causal-lm" else "per-tensor"

    def uses_calibration(self) -> bool:
        return self.scheme == "gptq" or (self.scheme == "int8-dynamic" and self.smooth_alpha is not None)


# ---------------------------------------------------------------------------- checks


def _selection(model: nn.Module, config: Quantize):
    skip_types = tuple(type(m) for m in quantized_modules(model).values())
    return select_layers(model, config.include, config.exclude, config.module_types, config.quantize_head,
                         config.embeddings != "none", skip_types=skip_types)


def _layer_problem(module: nn.Module, config: Quantize, device: str) -> str | None:
    """Why this scheme cannot quantize this layer here, or None."""
    if config.scheme in bnb_quant.BNB_SCHEMES:
        return bnb_quant.probe(module, config.scheme, device, config.compute_dtype, config.double_quant)
    if config.scheme in ("int8-weight", "int4-weight", "gptq"):
        bits = 8 if config.scheme == "int8-weight" else 4
        return group_problem(in_out(module)[0], bits, config.resolved_group_size())
    return None


def check_quantize(bundle: ModelBundle, config: Quantize, ctx: RunContext) -> list[str]:
    model = bundle.model
    problems = []
    has_bnb = any(isinstance(m, bnb_quant.bnb_layer_types()) for m in model.modules())
    has_own = bundle.format == qformat.FORMAT or any(is_own_layer(m) for m in model.modules())
    if config.scheme in bnb_quant.BNB_SCHEMES and (has_own or has_bnb):
        problems.append(f"scheme: {config.scheme} (bitsandbytes) needs an unquantized model, but this one is "
                        f"already quantized; use one quantize stage, or a non-bitsandbytes scheme")
    elif has_bnb:
        problems.append(f"scheme: the model holds bitsandbytes layers, which {config.scheme} cannot be "
                        f"combined with; quantize in one stage")
    device = torch.device(ctx.device).type
    if config.scheme == "int8-dynamic":
        if device != "cpu":
            problems.append(f"scheme: int8-dynamic runs on CPU kernels (fbgemm) but the device is "
                            f"{ctx.device}; use scheme int8 or nf4 (bitsandbytes) on GPU, or set device: cpu")
        elif (why := kernel_available()) is not None:
            problems.append(f"scheme: int8-dynamic cannot run here ({why}); use int8-weight")
    if config.scheme in bnb_quant.BNB_SCHEMES:
        why = bnb_quant.probe(nn.Linear(64, 64), config.scheme, ctx.device, config.compute_dtype,
                              config.double_quant)
        if why is not None:
            problems.append(f"scheme: bitsandbytes {config.scheme} cannot run on device {ctx.device} "
                            f"({why}); use {CPU_ALTERNATIVE}")
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
    if config.on_unsupported == "error" and config.scheme not in bnb_quant.BNB_SCHEMES:
        for name in sel.linear:
            why = _layer_problem(model.get_submodule(name), config, ctx.device)
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


def _quantize_own(model: nn.Module, names: list[str], config: Quantize, bundle: ModelBundle,
                  ctx: RunContext, errors: dict[str, float]) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    stats = None
    if config.uses_calibration():
        seed = ctx.seed if config.calibration_seed is None else config.calibration_seed
        batches = calibration_batches(bundle, ctx.data, config.calibration_samples, seed,
                                      field="quantize.calibration_samples")
        stats = input_stats(model, {n: model.get_submodule(n) for n in names}, batches,
                            hessian=config.scheme == "gptq")
        facts.update(calibration_samples=batch_rows(batches), calibration_seed=seed,
                     calibration_tokens=batch_tokens(batches))
    group = config.resolved_group_size()
    per_token = config.resolved_activation_scales(bundle.task) == "per-token"
    if config.scheme == "int8-dynamic":
        facts["activation_scales"] = "per-token" if per_token else "per-tensor"
    for name in names:
        original = model.get_submodule(name)
        linear = as_linear(original)  # Conv1D / linear subclasses: the plain linear they compute
        if config.scheme == "int8-dynamic":
            smooth = None
            if stats is not None:
                smooth = smoothing_factors(stats[name].absmax, linear.weight, config.smooth_alpha)
            new: nn.Module = DynamicInt8Linear.from_linear(linear, smooth, per_token)
        elif config.scheme == "gptq":
            new = WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None, 4, group)
            try:
                codes, scales, zeros = gptq_quantize(linear.weight, stats[name].mean_hessian(), 4, group,
                                                     config.gptq_damp, config.gptq_block_size)
            except ValueError as exc:
                raise StageError(f"quantize.gptq_damp: layer {name}: {exc}") from None
            new.set_codes(codes, scales, zeros)
            if linear.bias is not None:
                new.bias.data.copy_(linear.bias.detach().float())
        else:
            new = WeightOnlyLinear.from_linear(linear, 8 if config.scheme == "int8-weight" else 4, group)
        _swap(model, name, new.to(linear.weight.device))
        # Measured on what the model now holds at that name, against the float weight it replaced.
        errors[name] = weight_error(model.get_submodule(name), dense_weight(original))
    return facts


def run_quantize(bundle: ModelBundle, config: Quantize, ctx: RunContext) -> StageResult:
    started = time.perf_counter()
    model = bundle.model
    model.eval()
    sel = _selection(model, config)
    skipped: list[dict[str, str]] = []
    targets = []
    for name in sel.linear:
        layer = model.get_submodule(name)
        why = _layer_problem(layer, config, ctx.device)
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
    facts: dict[str, Any] = {}
    errors: dict[str, float] = {}
    embedded: list[str] = []
    with torch.no_grad():
        if config.scheme in bnb_quant.BNB_SCHEMES:
            work = ctx.work_dir
            fmt = bnb_quant.output_format(model)
            dense = model
            model = bnb_quant.quantize_with_bnb(model, bundle.task, config.scheme, targets, work, ctx.device,
                                                config.compute_dtype, config.double_quant,
                                                config.int8_threshold)
            for name in targets:
                layer = model.get_submodule(name)
                errors[name] = weight_error(layer, dense_weight(dense.get_submodule(name)))
        else:
            facts = _quantize_own(model, targets, config, bundle, ctx, errors)
            embedded, emb_facts = _quantize_embeddings(model, sel.embeddings, config, skipped)
            facts.update(emb_facts)
            fmt = qformat.FORMAT
    selected = len(sel.linear) + len(sel.embeddings)
    facts.update(check_layers(model, config.scheme, targets, errors, embedded, selected))
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
