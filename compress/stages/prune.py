"""Pruning stage: unstructured or N:M masks (magnitude, Wanda), or structured removal of attention
heads, FFN channels or layers that shrinks shapes and rewrites the config to match."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.bundle import ModelBundle
from compress.calibration import batch_rows, calibration_batches, input_norms
from compress.context import RunContext
from compress.errors import StageError
from compress.layers import bad_patterns, first_match, ignore_field, pattern_problems, targets_field
from compress.methods import FamilyConfig, MethodFamily
from compress.pruning import importance as imp
from compress.pruning import owl, passes, verify
from compress.pruning import structured as st
from compress.pruning.targets import in_features, is_conv1d, select_linears
from compress.registry import StageResult, register_stage

STRUCTURED = ("heads", "ffn", "layers")
_NM = re.compile(r"^(\d+):(\d+)$")

NOTE_DENSE = ("Unstructured zeros are stored and multiplied like any other weight by dense CPU kernels: "
              "this gives no speed-up and no smaller file; it only helps with a sparse format or kernel.")
NOTE_NM = ("N:M zeros give no speed-up with dense CPU kernels; 2:4 can be accelerated only by sparse "
           "tensor cores (NVIDIA Ampere or newer, torch semi-structured sparsity), which this stage does "
           "not enable.")


class Prune(FamilyConfig):
    """Prune weights: unstructured / N:M masks (magnitude, Wanda, SparseGPT) or heads / FFN channels / layers."""

    type: Literal["prune"] = "prune"
    structure: str = Field(
        "unstructured", description="What is removed: single weights (masked to zero), N:M groups (masked), "
        "or whole attention-head groups, FFN channels or layers (shapes shrink). Each structure takes its "
        "own fields (see `compress stages`).")
    calibration_samples: int | None = Field(None, gt=0, description=(
        "wanda / sparsegpt / owl / activation / taylor: calibration blocks of data.max_length tokens, drawn "
        "with the stage seed (one example per block for classification); default: data.calibration_samples."))

    def needs_data(self) -> bool:
        raise NotImplementedError  # each structure says


class _MaskPrune(Prune):
    """Unstructured and N:M: a keep-mask per selected linear layer; shapes stay."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "magnitude", description="magnitude drops the smallest |W|; wanda drops the smallest |W| * ||X|| "
        "(needs calibration data); sparsegpt also updates the kept weights so each layer's output on "
        "calibration data changes least (needs calibration data; slower: one Hessian per layer, blocks "
        "pruned in order).")
    targets: list[str] | None = targets_field("prune")
    ignore: list[str] | None = ignore_field("pruned")
    sequential: bool = Field(False, description=(
        "wanda: measure each block's input norms on the outputs of the blocks already pruned before it (the "
        "order of the Wanda and OWL reference code; about two forward passes), instead of on the dense model "
        "in one pass. OWL's outlier ratios still come from the dense model, as in its reference. sparsegpt "
        "always prunes block by block; magnitude reads no inputs."))

    @model_validator(mode="after")
    def _patterns(self) -> _MaskPrune:
        bad = bad_patterns(self.targets) + bad_patterns(self.ignore)
        if bad:
            raise ValueError(f"targets: invalid regular expression {', '.join(bad)}")
        if self.sequential and self.method != "wanda":
            why = "always prunes block by block" if self.method == "sparsegpt" else "reads no inputs"
            raise ValueError(f"sequential: only wanda takes it ({self.method} {why}); remove sequential")
        return self


class PruneUnstructured(_MaskPrune):
    """Unstructured: the given share of each selected layer's weights, uniform or OWL layer-wise."""

    structure: Literal["unstructured"] = "unstructured"
    sparsity: float = Field(..., ge=0, lt=1, description="Share of each layer's weights removed (e.g. 0.5).")
    layer_sparsity: dict[str, float] = Field(
        default_factory=dict, description="Per-layer sparsity: {name pattern: sparsity} (patterns as in "
        "targets); the first match wins, others get `sparsity`.")
    allocation: Literal["uniform", "owl"] = Field("uniform", description=(
        "How sparsity is spread over the model's blocks. uniform = every layer gets `sparsity`; owl = "
        "outlier-weighted layer-wise sparsity (Yin et al. 2024): blocks with more outlier Wanda scores are "
        "pruned less, over a span of 2 x owl_spread, keeping the overall sparsity (needs calibration data). "
        "Helps most at 60-70% sparsity."))
    owl_threshold: float = Field(5.0, gt=0, description=(
        "owl: a score counts as an outlier above this many times its block's mean score (OWL's M). The "
        "default 5 (with owl_spread 0.08) is the paper's, tuned on LLaMA; on SmolLM2-135M at 70% a partial "
        "sweep preferred M = 10 with owl_spread 0.15 (reports/frontier-sparsity.md): one small model, so "
        "the defaults stay the paper's; tune both per model."))
    owl_spread: float = Field(0.08, gt=0, lt=0.5, description=(
        "owl: half the span between the most and least pruned block (OWL's lambda). As in the authors' "
        "code the span is centred on the blocks' mean, so one outlier block can sit up to ~2 x owl_spread "
        "below `sparsity`; a block pushed outside [0, 1) stops the stage."))

    @model_validator(mode="after")
    def _consistent(self) -> PruneUnstructured:
        for name, value in self.layer_sparsity.items():
            if not 0 <= value < 1:
                raise ValueError(f"layer_sparsity: {value} for {name!r} is outside [0, 1)")
        if bad := bad_patterns(list(self.layer_sparsity)):
            raise ValueError(f"layer_sparsity: invalid regular expression {', '.join(bad)}")
        if self.allocation == "owl":
            if self.layer_sparsity:
                raise ValueError("allocation: owl chooses each block's sparsity itself; remove "
                                 "layer_sparsity or use allocation: uniform")
            if not self.owl_spread <= self.sparsity < 1 - self.owl_spread:
                raise ValueError(f"owl_spread: sparsity {self.sparsity} ± {self.owl_spread} leaves [0, 1); "
                                 f"lower owl_spread")
        else:
            for name in ("owl_threshold", "owl_spread"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name}: only used with allocation: owl; remove it or set allocation")
        return self

    def needs_data(self) -> bool:
        return self.method in ("wanda", "sparsegpt") or self.allocation == "owl"


class PruneNM(_MaskPrune):
    """N:M: keep N of every M consecutive input weights (2:4 runs on sparse tensor cores)."""

    structure: Literal["n:m"] = "n:m"
    pattern: str = Field("2:4", description="Keep N of every M consecutive input weights (2:4, 4:8); "
                                            "the pattern fixes the sparsity (2:4 is 50%).")

    @model_validator(mode="after")
    def _pattern(self) -> PruneNM:
        m = _NM.match(self.pattern)
        if not m or not 0 < int(m[1]) < int(m[2]):
            raise ValueError(f"pattern: {self.pattern!r} is not N:M with 0 < N < M; use e.g. '2:4' or '4:8'")
        return self

    def nm(self) -> tuple[int, int]:
        m = _NM.match(self.pattern)
        return int(m[1]), int(m[2])

    def needs_data(self) -> bool:
        return self.method in ("wanda", "sparsegpt")


class _StructuredPrune(Prune):
    """Heads, FFN channels or layers: removed, so shapes shrink and the config is rewritten."""

    sparsity: float | None = Field(None, ge=0, lt=1, description="Share of the heads, FFN channels or layers "
                                                                 "removed (one of sparsity or count).")
    count: int | None = Field(None, gt=0, description="Instead of sparsity: heads or FFN channels to remove "
                                                       "per layer, or layers to remove.")
    importance: Literal["weight", "activation", "taylor"] | None = Field(
        None, description="How units are ranked. weight = weight norms; activation = activation norms "
        "(layers: block influence); taylor = |weight * gradient|. Default: weight for heads/ffn, activation "
        "for layers.")

    @model_validator(mode="after")
    def _one_amount(self) -> _StructuredPrune:
        if (self.sparsity is None) == (self.count is None):
            raise ValueError(f"sparsity: {self.structure} pruning needs exactly one of sparsity (a share) or "
                             f"count (a number per layer)")
        return self

    def ranking(self) -> str:
        return self.importance or "weight"

    def needs_data(self) -> bool:
        return self.ranking() in ("activation", "taylor")


class PruneHeads(_StructuredPrune):
    """Attention-head groups (GQA-aware), the same number in every layer."""

    structure: Literal["heads"] = "heads"


class PruneFfn(_StructuredPrune):
    """FFN channels, the same number in every layer."""

    structure: Literal["ffn"] = "ffn"


class PruneLayers(_StructuredPrune):
    """Whole layers (blocks), ranked by block influence by default."""

    structure: Literal["layers"] = "layers"

    @model_validator(mode="after")
    def _comparable_ranking(self) -> PruneLayers:
        if self.importance == "weight":
            raise ValueError("importance: weight norms do not compare across layers; "
                             "use activation (block influence) or taylor")
        return self

    def ranking(self) -> str:
        return self.importance or "activation"


PRUNE_STRUCTURES = MethodFamily(Prune, "structure", default="unstructured")


# ---------------------------------------------------------------------------- checks


def _removal_count(config: Prune, total: int) -> int:
    return config.count if config.count is not None else round(config.sparsity * total)


def _arch(model: Any, structure: str) -> st.Arch | None:
    arch = st.detect(model)
    return arch if arch is not None or structure != "layers" else st.detect_layers(model)


def _structured_problems(bundle: ModelBundle, config: Prune) -> list[str]:
    arch = _arch(bundle.model, config.structure)
    if arch is not None and arch.family == "layers" and (why := st.unlike_layers(arch)):
        return [f"structure: layers removal of {type(bundle.model).__name__} is not possible: {why}"]
    if arch is None:
        conv = " (its attention and MLP are fused Conv1D layers)" if any(
            is_conv1d(m) for m in bundle.model.modules()) else ""
        return [(f"structure: {config.structure} pruning supports models with separate q/k/v and FFN "
                f"projections (BERT, RoBERTa, DeBERTa-v2, DistilBERT, OPT, Llama, Mistral, Qwen, Gemma); "
                f"{type(bundle.model).__name__}{conv} fuses them; use structure: layers, unstructured or n:m")]
    odd = sorted({type(m).__name__ for b in arch.blocks for m in (b.q, b.k, b.v, b.o, b.ffn_out, *b.ffn_in)
                  if m is not None and type(m) is not torch.nn.Linear})
    if odd:
        return [(f"structure: {config.structure} pruning needs plain linear layers, but this model holds "
                f"{', '.join(odd)}; put the prune stage before quantize or lowrank stages")]
    field = "count" if config.count is not None else "sparsity"
    unit, total = {"heads": ("attention heads", lambda: arch.num_heads),  # lazily: GPT-2 has no
                   "ffn": ("FFN channels", lambda: arch.intermediate),    # intermediate_size
                   "layers": ("layers", lambda: arch.num_layers)}[config.structure]
    total = total()
    remove = _removal_count(config, total)
    where = "" if config.structure == "layers" else " per layer"
    if remove < 1:
        return [(f"{field}: {config.sparsity} of {total} {unit} removes none; "
                f"raise it to at least {1 / total:.3g}")]
    if remove >= total:
        return [f"{field}: removing {remove} of {total} {unit}{where} leaves none; remove fewer than {total}"]
    if config.structure != "heads":
        return []
    if arch.family == "bert":
        return [(f"structure: {type(arch.config).__name__} derives the head size from hidden_size / "
                f"num_attention_heads, so a checkpoint with fewer heads cannot be reloaded by from_pretrained; "
                f"use structure: ffn or layers")]
    per_group = arch.num_heads // arch.num_kv_heads
    if remove % per_group:
        return [(f"{field}: removing {remove} of {total} attention heads breaks grouped-query attention "
                f"({per_group} query heads share each of the {arch.num_kv_heads} key/value heads); remove a "
                f"multiple of {per_group} heads (sparsity a multiple of {per_group / total:.3g})")]
    left = total - remove
    if arch.config.hidden_size % left:
        return [(f"{field}: {left} heads left does not divide hidden_size {arch.config.hidden_size}, which "
                f"{type(arch.config).__name__} requires to reload; choose a count leaving a divisor")]
    return []


def check_prune(bundle: ModelBundle, config: Prune, ctx: RunContext) -> list[str]:
    problems = []
    if config.needs_data() and (ctx is None or ctx.data is None):
        if isinstance(config, _StructuredPrune):
            field, value, fix = "importance", config.ranking(), "importance: weight"
        else:
            field, value, fix = "method", config.method, "method: magnitude"
        problems.append(f"{field}: {value} needs calibration data (activations on real inputs) but the "
                        f"recipe has no data section; add one or use {fix}")
    if isinstance(config, _StructuredPrune):
        return problems + _structured_problems(bundle, config)
    unmatched = pattern_problems(bundle.model, {"targets": config.targets, "ignore": config.ignore,
                                                "layer_sparsity": list(getattr(config, "layer_sparsity", {}))})
    linears = select_linears(bundle.model, config.targets, config.ignore, conv1d=True)
    if unmatched or not linears:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in bundle.model.named_modules()
                        if isinstance(m, torch.nn.Linear) or is_conv1d(m)})
    if unmatched:
        return problems + [f"{p}; linear layers here: {', '.join(names)}" for p in unmatched]
    if not linears:
        chosen = (f"matches targets {config.targets}" if config.targets else "is left")
        return problems + [(f"targets: no linear layer {chosen} after leaving out "
                           f"{config.ignore or 'the heads and embeddings'}; "
                           f"linear layers here: {', '.join(names)}")]
    if isinstance(config, PruneNM):
        _, m = config.nm()
        bad = [f"{n} (in {in_features(lin)})" for n, lin in linears.items() if in_features(lin) % m]
        if bad:
            problems.append(f"pattern: M={m} does not divide the input dimension of {', '.join(bad[:3])}"
                            f"{' and others' if len(bad) > 3 else ''}; choose an M that divides it or "
                            f"ignore those layers")
    return problems


# ---------------------------------------------------------------------------- run


def _sparsity(tensors: list[torch.Tensor]) -> float:
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return round(zeros / total, 6) if total else 0.0


def _prune_masks(bundle: ModelBundle, config: Prune, ctx: RunContext) -> StageResult:
    model = bundle.model
    linears = select_linears(model, config.targets, config.ignore, conv1d=True)
    batches = (calibration_batches(bundle, ctx.data, config.calibration_samples, ctx.seed)
               if config.needs_data() else None)
    nm = config.nm() if isinstance(config, PruneNM) else None
    use_owl = isinstance(config, PruneUnstructured) and config.allocation == "owl"
    dense_norms = use_owl or (config.method == "wanda" and not config.sequential)
    norms = input_norms(model, linears, batches) if dense_norms else {}
    owl_facts: dict[str, Any] = {}
    if nm is not None:
        sparsity = {}
    elif use_owl:
        ratios = owl.outlier_ratios(linears, norms, config.owl_threshold)
        blocks = owl.block_sparsities(ratios, config.sparsity, config.owl_spread)
        sparsity = owl.layer_sparsities(linears, blocks, config.sparsity)
        owl_facts.update(block_outlier_ratio={b: round(r, 6) for b, r in ratios.items()}, block_sparsity=blocks)
    else:
        sparsity = {n: first_match(n, config.layer_sparsity, config.sparsity) for n in linears}
    masks = dict(bundle.masks)
    per_layer = {}
    with torch.no_grad():
        if config.method == "sparsegpt":
            chosen = passes.sparsegpt_masks(model, linears, batches, sparsity, nm)
        elif config.method == "wanda" and config.sequential:
            chosen = passes.wanda_sequential_masks(model, linears, batches, sparsity, nm)
        else:
            chosen = passes.score_masks(config.method, linears, norms, sparsity, nm)
        for name, mask in chosen:
            weight = linears[name].weight
            if is_conv1d(linears[name]):  # masks are kept in the parameter's own (in, out) layout
                mask = mask.T.contiguous()
            key = f"{name}.weight"
            if key in masks:  # an earlier prune stage's zeros stay zero
                mask &= masks[key].to(mask.device)
            weight.mul_(mask.to(weight.dtype))
            masks[key] = mask.cpu()
            per_layer[name] = _sparsity([weight])
    verify.check_masked(config.label(), linears, masks, sparsity or None, nm)
    if use_owl:
        overall = _sparsity([lin.weight for lin in linears.values()])
        # OWL moves sparsity between blocks; it must not change how much is pruned overall.
        if abs(overall - config.sparsity) > 0.01:
            raise StageError(f"{config.label()}: owl allocation pruned {overall:.4f} of the selected "
                             f"weights overall, not the target {config.sparsity} (within 0.01): "
                             f"block sparsities {owl_facts['block_sparsity']}")
    out = bundle.replace(model=model, masks=masks)
    target_sparsity = (1 - nm[0] / nm[1]) if nm is not None else config.sparsity
    facts = {
        "structure": config.structure, "method": config.method,
        "allocation": "owl" if use_owl else "uniform" if nm is None else None,
        "pattern": config.pattern if nm is not None else None,
        "target_sparsity": target_sparsity, "layers_pruned": len(linears),
        "measured_sparsity_pruned_layers": _sparsity([lin.weight for lin in linears.values()]),
        "measured_sparsity_model": _sparsity(list(model.parameters())),
        "calibration_samples": batch_rows(batches) if batches else None,
        "speed_note": NOTE_NM if config.structure == "n:m" else NOTE_DENSE,
    }
    out.record("prune", config.model_dump(mode="json"), **facts)
    return StageResult(out, {**facts, **owl_facts, "per_layer_sparsity": per_layer})


def _lowest(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices kept: all but the `remove` lowest scores, in their original order."""
    keep = torch.topk(scores, len(scores) - remove).indices
    return keep.sort().values


def _carry_masks(model: Any, masks: dict[str, torch.Tensor], layer_prefix: str,
                 renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """Masks follow their weights through removal: renamed with their layer, dropped with it, and
    re-derived from the (already zeroed) weights when the weight's shape shrank."""
    params = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        if renames and name.startswith(layer_prefix + "."):
            old = next((o for o in renames if name.startswith(o)), None)
            if old is None:
                continue  # its layer was removed
            name = renames[old] + name[len(old):]
        param = params.get(name)
        if param is None:
            continue
        out[name] = mask if mask.shape == param.shape else (param.detach() != 0).cpu()
    return out


def _prune_structured(bundle: ModelBundle, config: Prune, ctx: RunContext) -> StageResult:
    model = bundle.model
    arch = _arch(model, config.structure)
    ranking = config.ranking()
    batches = (calibration_batches(bundle, ctx.data, config.calibration_samples, ctx.seed)
               if config.needs_data() else None)
    params_before = sum(p.numel() for p in model.parameters())
    prefix = next(n for n, m in model.named_modules() if m is arch.owner) + "." + arch.attr
    renames: dict[str, str] = {}
    facts: dict[str, Any] = {"structure": config.structure, "importance": ranking}
    if config.structure == "ffn":
        remove = _removal_count(config, arch.intermediate)
        scores = imp.ffn_scores(model, arch, ranking, batches)
        facts.update(intermediate_size_before=arch.intermediate,
                     intermediate_size_after=arch.intermediate - remove)
        st.remove_ffn_channels(arch, [_lowest(s, remove) for s in scores])
        facts["uniform_note"] = (f"{type(model.config).__name__} holds one intermediate_size for all "
                                 f"layers, so {remove} channels were removed in every layer "
                                 f"(chosen per layer)")
    elif config.structure == "heads":
        per_group = arch.num_heads // arch.num_kv_heads
        remove = _removal_count(config, arch.num_heads) // per_group
        scores = imp.head_group_scores(model, arch, ranking, batches)
        facts.update(heads_before=arch.num_heads, heads_after=arch.num_heads - remove * per_group,
                     kv_heads_before=arch.num_kv_heads, kv_heads_after=arch.num_kv_heads - remove)
        kept = [_lowest(s, remove) for s in scores]
        st.remove_head_groups(arch, kept)
        facts["uniform_note"] = (f"{type(model.config).__name__} holds one head count for all layers, so "
                                 f"{remove} key/value group(s) of {per_group} query heads were removed in "
                                 f"every layer")
        facts["kept_head_groups"] = [k.tolist() for k in kept]
    else:
        remove = _removal_count(config, arch.num_layers)
        scores = imp.layer_scores(model, arch, ranking, batches)
        drop = sorted(set(range(arch.num_layers)) - set(_lowest(scores, remove).tolist()))
        renames = st.layer_renames(arch.num_layers, drop, prefix)
        facts.update(layers_before=arch.num_layers, layers_after=arch.num_layers - remove,
                     removed_layers=drop, layer_scores=[round(float(s), 6) for s in scores])
        st.remove_layers(arch, drop)
    verify.check_reloadable(config.label(), model, bundle.task)
    params_after = sum(p.numel() for p in model.parameters())
    facts.update(parameters_before=params_before, parameters_after=params_after,
                 parameters_removed_percent=round(100 * (1 - params_after / params_before), 3),
                 speed_note="Shapes shrank: the model is smaller on disk and runs fewer FLOPs with dense "
                            "kernels.")
    out = bundle.replace(model=model, masks=_carry_masks(model, bundle.masks, prefix, renames))
    out.record("prune", config.model_dump(mode="json"),
               **{k: v for k, v in facts.items() if k not in ("layer_scores", "kept_head_groups")})
    return StageResult(out, facts)


def run_prune(bundle: ModelBundle, config: Prune, ctx: RunContext) -> StageResult:
    problems = check_prune(bundle, config, ctx)
    if problems:
        raise StageError("prune." + "; prune.".join(problems))
    return PRUNE_STRUCTURES.handler(config)(bundle, config, ctx)


for _cls, _handler in ((PruneUnstructured, _prune_masks), (PruneNM, _prune_masks), (PruneHeads, _prune_structured),
                       (PruneFfn, _prune_structured), (PruneLayers, _prune_structured)):
    PRUNE_STRUCTURES.register(_cls, _handler)
register_stage(Prune, run_prune, check=check_prune)
