"""What a model is made of, read from its config alone: the model is built on the meta device
(accelerate's `init_empty_weights`), so parameters are counted per module exactly and no weight is
loaded or downloaded."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Shape:
    """Parameter counts and the dimensions the activation estimate needs."""

    total: int                                   # every parameter (tied ones once)
    linears: dict[str, tuple[int, int]]          # adaptable linear layers (name -> (in, out)), head excluded
    linear_bias: int                             # bias parameters of those layers
    layers: int                                  # transformer blocks
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    causal_lm: bool
    block_params: int                            # parameters of the largest block (a ZeRO-3/FSDP gather)
    hidden_dropout: float = 0.0                  # dropout on block outputs (BERT-style), in training
    attention_dropout: float = 0.0               # dropout on attention probabilities, in training
    module_params: dict[str, int] = field(default_factory=dict)  # every module's parameter count
    accelerate_total_bytes: int = 0              # accelerate's calculate_maximum_sizes on the same model
    accelerate_largest_layer_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linears.values())

    @property
    def other_params(self) -> int:
        """Embeddings, norms, output head, biases: what stays float when the linears are quantized."""
        return self.total - self.linear_params - self.linear_bias

    @property
    def kv_dim(self) -> int:
        return self.hidden // max(self.heads, 1) * self.kv_heads

    def trained_in_full(self, modules_to_save: list[str] | None) -> int:
        """Parameters peft trains in full beside the adapters: a classifier head (always, as compress's
        finetune does) and `modules_to_save` (matched like targets)."""
        from compress.training.adapters import HEAD_NAMES

        names = [*(modules_to_save or []), *(HEAD_NAMES if not self.causal_lm else ())]
        chosen = {n for n in self.module_params if any(n == t or n.endswith("." + t) for t in names)}
        # a module inside another chosen one is already counted with it
        return sum(self.module_params[n] for n in chosen if not any(n.startswith(o + ".") for o in chosen))

    def selected(self, targets: list[str] | None, ignore: list[str] | None) -> dict[str, tuple[int, int]]:
        """The linears a prune / low-rank / quantize stage picks (compress.layers' one rule; the head is
        not among `linears`, embedding-side layers are left out unless `targets` names them)."""
        from compress.layers import is_default_ignored, matches_any

        return {n: s for n, s in self.linears.items()
                if (matches_any(n, targets) if targets is not None else not is_default_ignored(n, set()))
                and not matches_any(n, ignore)}

    def matching(self, targets: list[str] | None) -> dict[str, tuple[int, int]]:
        """The linears `targets` names (peft's rule: a full name or a dotted suffix); None: all of them."""
        if not targets:
            return dict(self.linears)
        return {n: s for n, s in self.linears.items() if any(n == t or n.endswith("." + t) for t in targets)}


def build_meta_model(config: Any, task: str) -> Any:
    """The model of `config` for `task`, with every parameter on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights

    from compress.bundle import auto_class

    with init_empty_weights():
        return auto_class(task).from_config(copy.deepcopy(config), dtype=torch.float32)


def _blocks(model: Any) -> list[torch.nn.Module]:
    """The repeated transformer blocks: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len, default=[])  # type: ignore[arg-type]


def model_shape(config: Any, task: str) -> Shape:
    """Count a model's parameters per module from its config (meta device: nothing is allocated)."""
    from accelerate.utils import calculate_maximum_sizes

    from compress.training.adapters import linear_layers

    model = build_meta_model(config, task)
    linears = {}
    bias = 0
    for name, module in linear_layers(model).items():
        weight = module.weight
        # transformers' Conv1D stores (in, out); nn.Linear stores (out, in)
        out_f, in_f = (weight.shape[1], weight.shape[0]) if type(module).__name__ == "Conv1D" else weight.shape
        linears[name] = (int(in_f), int(out_f))
        bias += module.bias.numel() if getattr(module, "bias", None) is not None else 0
    blocks = _blocks(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "d_model", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 1)
    total_bytes, largest = calculate_maximum_sizes(model)
    return Shape(
        total=sum(p.numel() for p in model.parameters()),
        linears=linears, linear_bias=bias, layers=len(blocks), hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 0) or 4 * hidden),
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", 0) or heads),
        vocab=int(getattr(text, "vocab_size", 0) or 0), causal_lm=task == "causal-lm",
        block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        hidden_dropout=_first(text, ("hidden_dropout_prob", "resid_pdrop", "hidden_dropout", "dropout")),
        attention_dropout=_first(text, ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")),
        module_params={n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules() if n},
        accelerate_total_bytes=int(total_bytes), accelerate_largest_layer_bytes=int(largest[0]),
    )


def _first(config: Any, keys: tuple[str, ...]) -> float:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


