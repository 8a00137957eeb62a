"""Structured removal that really shrinks shapes: attention heads, FFN channels, whole layers.

The result must reload with plain `from_pretrained`, so every change is mirrored in the config.
BERT and Llama configs (and OPT's, DistilBERT's) hold one FFN size / `num_attention_heads` for all layers, so
the same *number* of channels/heads is removed in every layer (which ones differs per layer).

Hand-written rather than torch-pruning (not a dependency here): that library rewires modules but
knows nothing of Hugging Face configs, which is the part that makes the output reloadable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Block:
    """One transformer layer's prunable pieces, whatever the family names them."""

    layer: torch.nn.Module
    # None for a "layers" architecture: whole-layer removal needs only the layer itself.
    q: torch.nn.Linear | None = None
    k: torch.nn.Linear | None = None
    v: torch.nn.Linear | None = None
    o: torch.nn.Linear | None = None
    attn: torch.nn.Module | None = None
    ffn_in: list[torch.nn.Linear] = field(default_factory=list)  # rows are intermediate channels
    ffn_out: torch.nn.Linear | None = None  # columns are intermediate channels


@dataclass
class Arch:
    family: str  # "bert", "llama", or "layers" (any layer list: whole layers only)
    owner: torch.nn.Module  # the module holding the layer list
    attr: str  # its attribute name
    blocks: list[Block]
    config: Any
    ffn_key: str = "intermediate_size"  # the config field sizing the FFN (OPT: ffn_dim, DistilBERT: hidden_dim)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads

    @property
    def intermediate(self) -> int:
        return getattr(self.config, self.ffn_key)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def detect(model: Any) -> Arch | None:
    """BERT-like encoders, Llama-like decoders (Llama, Mistral, Qwen, Gemma), OPT and DistilBERT; else None."""
    base = model.base_model
    encoder = getattr(base, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer"):
        layers = encoder.layer
        if len(layers) and hasattr(layers[0], "attention") and hasattr(layers[0].attention, "self"):
            # BERT/RoBERTa name the projections query/key/value, DeBERTa-v2 query_proj/key_proj/value_proj.
            qkv = next((names for names in (("query", "key", "value"), ("query_proj", "key_proj", "value_proj"))
                        if all(hasattr(layers[0].attention.self, n) for n in names)), None)
            if qkv is None:
                return None
            blocks = [Block(lay, *(getattr(lay.attention.self, n) for n in qkv), lay.attention.output.dense,
                            lay.attention.self, [lay.intermediate.dense], lay.output.dense) for lay in layers]
            return Arch("bert", encoder, "layer", blocks, model.config)
    layers = getattr(base, "layers", None)
    if layers is not None and len(layers) and hasattr(layers[0], "self_attn") and hasattr(layers[0], "mlp"):
        a, f = layers[0].self_attn, layers[0].mlp
        if all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
                hasattr(f, n) for n in ("gate_proj", "up_proj", "down_proj")):
            blocks = [Block(lay, lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj,
                            lay.self_attn.o_proj, lay.self_attn, [lay.mlp.gate_proj, lay.mlp.up_proj],
                            lay.mlp.down_proj) for lay in layers]
            return Arch("llama", base, "layers", blocks, model.config)
    return _detect_fixed_heads(base, model.config)


def _detect_fixed_heads(base: Any, config: Any) -> Arch | None:
    """OPT decoders and DistilBERT encoders: plain q/k/v/out projections and a two-layer FFN. Their head
    size is hidden / heads, so like BERT they allow FFN and layer removal, not head removal."""
    decoder = getattr(base, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is not None and len(layers) and all(hasattr(layers[0], n) for n in ("self_attn", "fc1", "fc2")):
        blocks = [Block(lay, lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj,
                        lay.self_attn.out_proj, lay.self_attn, [lay.fc1], lay.fc2) for lay in layers]
        return Arch("bert", decoder, "layers", blocks, config, ffn_key="ffn_dim")
    transformer = getattr(base, "transformer", None)
    layers = getattr(transformer, "layer", None)
    if layers is not None and len(layers) and hasattr(layers[0], "ffn") and hasattr(layers[0].ffn, "lin1"):
        blocks = [Block(lay, lay.attention.q_lin, lay.attention.k_lin, lay.attention.v_lin,
                        lay.attention.out_lin, lay.attention, [lay.ffn.lin1], lay.ffn.lin2) for lay in layers]
        return Arch("bert", transformer, "layer", blocks, config, ffn_key="hidden_dim")
    return None


def detect_layers(model: Any) -> Arch | None:
    """Any model whose blocks sit in one layer list sized by config.num_hidden_layers (GPT-2, OPT, Phi-3,
    Falcon, GPT-NeoX, DistilBERT, ...): enough to remove whole layers, nothing finer."""
    from compress.distill.student import layer_list_name

    try:
        name = layer_list_name(model)
    except ValueError:
        return None
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    return Arch("layers", owner, attr, [Block(lay) for lay in getattr(owner, attr)], model.config)


def unlike_layers(arch: Arch) -> str | None:
    """Why layers cannot be renumbered, or None: a layer whose parameters differ from the first's (e.g.
    ModernBERT builds layer 0 without an attention norm) would not fit the place it moves to."""
    def shapes(layer: torch.nn.Module) -> dict[str, tuple]:
        return {n: tuple(p.shape) for n, p in layer.named_parameters()}

    first = shapes(arch.blocks[0].layer)
    for i, block in enumerate(arch.blocks[1:], start=1):
        other = shapes(block.layer)
        if other != first:
            diff = sorted(set(other).symmetric_difference(first)) or sorted(
                n for n in first if first[n] != other[n])
            return (f"layer {i} differs from layer 0 ({diff[0]}), so layers cannot be renumbered into "
                    f"each other's places")
    return None


def _slice_linear(linear: torch.nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> torch.nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach()[rows] if rows is not None else bias.detach())
    return new


def _replace(root: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    for _name, parent in root.named_modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return
    raise RuntimeError("module to replace not found")


def remove_ffn_channels(arch: Arch, keep: list[torch.Tensor]) -> None:
    """Keep channels `keep[i]` (sorted indices) of layer i's FFN; all layers keep the same count."""
    sizes = {len(k) for k in keep}
    assert len(sizes) == 1, "the config holds one intermediate_size: keep the same count in every layer"
    for block, idx in zip(arch.blocks, keep, strict=True):
        idx = idx.sort().values.to(block.ffn_out.weight.device)
        for lin in block.ffn_in:
            _replace(block.layer, lin, _slice_linear(lin, rows=idx))
        _replace(block.layer, block.ffn_out, _slice_linear(block.ffn_out, cols=idx))
    setattr(arch.config, arch.ffn_key, sizes.pop())


def remove_head_groups(arch: Arch, keep_groups: list[torch.Tensor]) -> None:
    """Keep key/value head groups `keep_groups[i]` in layer i (Llama-like only). A group is one
    key/value head and the query heads that share it, so grouped-query attention stays intact."""
    if arch.family != "llama":
        raise ValueError(f"head removal is not supported for {arch.family}")
    d, per_group = arch.head_dim, arch.num_heads // arch.num_kv_heads
    kept_groups = {len(k) for k in keep_groups}
    assert len(kept_groups) == 1
    n_groups = kept_groups.pop()
    for block, groups in zip(arch.blocks, keep_groups, strict=True):
        groups = groups.sort().values
        kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in groups.tolist()])
        q_heads = [g * per_group + j for g in groups.tolist() for j in range(per_group)]
        q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in q_heads])
        dev = block.q.weight.device
        _replace(block.layer, block.q, _slice_linear(block.q, rows=q_rows.to(dev)))
        _replace(block.layer, block.k, _slice_linear(block.k, rows=kv_rows.to(dev)))
        _replace(block.layer, block.v, _slice_linear(block.v, rows=kv_rows.to(dev)))
        _replace(block.layer, block.o, _slice_linear(block.o, cols=q_rows.to(dev)))
        for attr, value in (("num_heads", n_groups * per_group), ("num_key_value_heads", n_groups),
                            ("num_attention_heads", n_groups * per_group)):
            if hasattr(block.attn, attr):
                setattr(block.attn, attr, value)
    # head_dim becomes explicit: with fewer heads, hidden_size // num_heads no longer equals it.
    arch.config.head_dim = d
    arch.config.num_attention_heads = n_groups * per_group
    arch.config.num_key_value_heads = n_groups


def remove_layers(arch: Arch, drop: list[int]) -> None:
    """Remove whole layers and renumber the rest (caches index layers by `layer_idx`)."""
    kept = [i for i in range(arch.num_layers) if i not in set(drop)]
    layers = getattr(arch.owner, arch.attr)
    setattr(arch.owner, arch.attr, torch.nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(getattr(arch.owner, arch.attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    arch.config.num_hidden_layers = len(kept)
    layer_types = getattr(arch.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        arch.config.layer_types = [layer_types[i] for i in kept]
    arch.blocks = [arch.blocks[i] for i in kept]


def layer_renames(num_layers: int, drop: list[int], prefix: str) -> dict[str, str]:
    """`{old prefix.i.: new prefix.j.}` for the layers that survive a removal (to carry masks over)."""
    kept = [i for i in range(num_layers) if i not in set(drop)]
    return {f"{prefix}.{old}.": f"{prefix}.{new}." for new, old in enumerate(kept)}
