"""AWQ (Lin et al., 2024, arXiv:2306.00978): activation-aware scaling, then weight clipping.

A few input channels carry most of the activation energy; rounding their weights costs the most
output error. AWQ multiplies those weight columns by s > 1 before rounding (finer relative grid)
and divides the input by s, folded into the op that produces it (a norm's weight, or the rows of a
previous linear), so the float model computes exactly the same function and nothing is added at run
time. s = mean|x|^alpha (optionally divided by the mean relative weight^(1-alpha), AutoAWQ's
`duo_scaling`), alpha chosen on a grid by the output error. Then each group's range is shrunk
(clipped) where that lowers its output error.

Hand-written, following AutoAWQ and llm-compressor's AWQModifier, because neither installs here
(llm-compressor pins its own transformers; AutoAWQ needs CUDA kernels) and both run each decoder
block on cached inputs with its own keyword arguments per architecture. Here every error is a
layer's output error computed exactly from its input Hessian, tr(ΔW H ΔWᵀ) = mean ||ΔW x||², so one
calibration pass over the float model (the same statistics GPTQ uses) serves every layer and every
architecture; the price is measuring each linear's output rather than the whole attention/MLP block's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.quant.grid import fake_quantize, grid_params, shrink_search
from compress.quant.select import in_out, linear_kind
from compress.quant.weight_only import effective_group, quantize_codes

# AutoAWQ's defaults: 20 values of alpha in [0, 1); clip ratios 1.0, 0.95, ..., 0.55.
SCALE_GRID = 20
CLIP_RATIOS = 1 - torch.arange(10) / 20


@dataclass(frozen=True)
class Pattern:
    """Where a scale can be folded, by trailing names inside one block: `prev`'s output feeds exactly
    the `balance` layers (`absent`: siblings whose presence means another layout; `relu_between`:
    the path prev -> balance runs through a ReLU, which commutes with a positive scale)."""

    prev: str
    balance: tuple[str, ...]
    absent: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    relu_between: bool = False


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
PATTERNS: tuple[Pattern, ...] = (
    # Llama, Mistral, Qwen2/3, Gemma (pre-norm decoders with separate q/k/v and a gated MLP)
    Pattern("input_layernorm", QKV),
    Pattern("post_attention_layernorm", GATE_UP, absent=("pre_feedforward_layernorm",)),
    Pattern("pre_feedforward_layernorm", GATE_UP),  # Gemma 2/3: post_attention_layernorm is on the output
    Pattern("self_attn.v_proj", ("self_attn.o_proj",)),  # only when the shapes match (no grouped KV)
    Pattern("mlp.up_proj", ("mlp.down_proj",), needs=("mlp.gate_proj",)),  # act(gate) * up is linear in up
    # Phi-3 (fused qkv and gate_up), GPT-NeoX (separate norms per branch)
    Pattern("input_layernorm", ("self_attn.qkv_proj",)),
    Pattern("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Pattern("input_layernorm", ("attention.query_key_value",)),
    Pattern("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    # OPT (pre-norm only: do_layer_norm_before), fc1 -> ReLU -> fc2
    Pattern("self_attn_layer_norm", QKV),
    Pattern("self_attn.v_proj", ("self_attn.out_proj",)),
    Pattern("final_layer_norm", ("fc1",)),
    Pattern("fc1", ("fc2",), relu_between=True),
    # GPT-2
    Pattern("ln_1", ("attn.c_attn",)),
    Pattern("ln_2", ("mlp.c_fc",)),
)


@dataclass
class Mapping:
    """One fold site found in a model: full module names."""

    prev: str
    balance: list[str]


def _is_norm(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return (linear_kind(module) is None and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and weight.shape[0] == width and weight.is_floating_point())


def _prev_ok(model: nn.Module, name: str, width: int) -> bool:
    module = model.get_submodule(name)
    if linear_kind(module) is not None:
        return in_out(module)[1] == width
    return _is_norm(module, width)


def _pre_norm(config: object) -> bool:
    # OPT-350m normalises after attention (post-LN): its norms then feed the residual too.
    return getattr(config, "do_layer_norm_before", True) is not False


def find_mappings(model: nn.Module, targets: list[str]) -> list[Mapping]:
    """The fold sites whose balance layers are all quantization targets; each target in one at most."""
    names = {n for n, _ in model.named_modules()}
    targets_set, claimed = set(targets), set()
    config = getattr(model, "config", None)
    found = []
    for name in (n for n, _ in model.named_modules()):
        for pat in PATTERNS:
            if not (name == pat.prev or name.endswith("." + pat.prev)):
                continue
            prefix = name[: len(name) - len(pat.prev)]
            balance = [prefix + b for b in pat.balance]
            if not all(b in targets_set and b not in claimed for b in balance):
                continue
            if any(prefix + a in names for a in pat.absent) or not all(prefix + n in names for n in pat.needs):
                continue
            if pat.relu_between and getattr(config, "activation_function", None) != "relu":
                continue
            if not _pre_norm(config) and pat.prev.endswith("layer_norm"):
                continue
            widths = {in_out(model.get_submodule(b))[0] for b in balance}
            if len(widths) != 1 or not _prev_ok(model, name, next(iter(widths))):
                continue
            claimed.update(balance)
            found.append(Mapping(name, balance))
    return found


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the mean squared output error of a weight change ΔW (out, in) on inputs with H."""
    return float(((delta @ hessian) * delta).sum())


def rtn(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest (min-max grid per group) of an (out, in) weight, back in float."""
    rows, cols = weight.shape
    g = effective_group(cols, group)
    grouped = weight.reshape(rows, -1, g)
    scale, zero = grid_params(grouped, bits, symmetric)
    return fake_quantize(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(rows, cols)


def search_scale(weights: list[torch.Tensor], mean_abs: torch.Tensor, hessian: torch.Tensor, bits: int,
                 group: int, symmetric: bool, duo_scaling: bool = False, grid: int = SCALE_GRID,
                 ) -> tuple[torch.Tensor, float, float, float]:
    """The per-input-channel scale s for layers sharing one input: s = mean|x|^alpha (normalised to
    geometric mean 1), alpha on a grid in [0, 1), chosen by the summed output error of
    Q(W diag(s)) diag(s)⁻¹. Returns (s, alpha, error at that alpha, error at alpha 0 = plain RTN)."""
    x = mean_abs.float().clamp(min=1e-4)
    w_rel = None
    if duo_scaling:  # AutoAWQ: also divide by the mean weight magnitude relative to its group's max
        stacked = torch.cat([w.float() for w in weights])
        rows, cols = stacked.shape
        g = effective_group(cols, group)
        grouped = stacked.abs().reshape(rows, -1, g)
        w_rel = (grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(rows, cols).mean(0)
        w_rel = w_rel.clamp(min=1e-4)
    best = (torch.ones_like(x), 0.0, float("inf"))
    base = float("inf")
    for i in range(grid):
        alpha = i / grid
        s = x.pow(alpha) if w_rel is None else x.pow(alpha) / w_rel.pow(1 - alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(output_error(rtn(w * s, bits, group, symmetric) / s - w, hessian) for w in weights)
        if i == 0:
            base = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], base


# ---------------------------------------------------------------------------- folding


def scale_inputs(module: nn.Module, s: torch.Tensor) -> None:
    """Multiply a linear layer's input columns by s (W diag(s)); GPT-2's Conv1D stores W transposed."""
    w = module.weight.data
    if linear_kind(module) == "conv1d":
        w.mul_(s.to(w).unsqueeze(1))
    else:
        w.mul_(s.to(w).unsqueeze(0))


def divide_outputs(module: nn.Module, s: torch.Tensor) -> None:
    """Divide what `module` outputs, channel by channel, by s: a norm's weight (and bias) or a linear's
    rows (and bias). Gemma's RMSNorm multiplies by (1 + weight), so its weight becomes (1 + w) / s - 1."""
    w = module.weight.data
    s = s.to(w)
    kind = linear_kind(module)
    if kind == "conv1d":
        w.div_(s.unsqueeze(0))
    elif kind == "linear":
        w.div_(s.unsqueeze(1))
    elif type(module).__name__.startswith("Gemma"):
        w.copy_((1 + w) / s - 1)
    else:
        w.div_(s)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.div_(s.to(bias.data))


def fold(model: nn.Module, mapping: Mapping, s: torch.Tensor) -> None:
    """Apply scale s at a fold site: the float model computes the same function afterwards."""
    divide_outputs(model.get_submodule(mapping.prev), s)
    for name in mapping.balance:
        scale_inputs(model.get_submodule(name), s)


# ---------------------------------------------------------------------------- rounding


def clip_and_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, symmetric: bool,
                      clip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out, in), scales and zeros (out, groups) of an (out, in) weight. With `clip`, each
    group's range is shrunk by the ratio in CLIP_RATIOS minimising that group's output error
    dᵀ H_gg d (its block of the input Hessian; groups are judged one at a time, as AutoAWQ does)."""
    rows, cols = weight.shape
    g = effective_group(cols, group)
    w = weight.float().reshape(rows, -1, g)
    if clip:
        n = cols // g
        blocks = torch.stack([hessian[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(n)]).float()

        def group_error(d: torch.Tensor) -> torch.Tensor:  # dᵀ H_gg d per (row, group), batched by group
            per_group = d.transpose(0, 1)
            return (torch.bmm(per_group, blocks) * per_group).sum(-1).transpose(0, 1)

        scale, zero = shrink_search(w, bits, group_error, CLIP_RATIOS, symmetric)
    else:
        scale, zero = grid_params(w, bits, symmetric)
    codes = quantize_codes(w, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(rows, cols)
    return codes, scale, zero
