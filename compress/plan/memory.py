"""Byte counts: weights in each storage format, training state, and activations.

The formulas follow what compress's own code allocates (its loader, peft as compress calls it, the
torch / bitsandbytes optimizers, transformers' gradient checkpointing); each says why in a comment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compress.plan.shapes import Shape

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BNB_BLOCK = 64        # bitsandbytes' 4-bit blocksize (the QLoRA paper's)
NESTED_BLOCK = 256    # double quantization: one fp32 constant per 256 first-level constants


def bnb4_bytes(n: int, double_quant: bool) -> int:
    """A bitsandbytes NF4/FP4 weight of `n` values: 4-bit codes packed two per byte, plus one absmax per
    64 values — fp32 without double quantization (0.5 bit/weight), uint8 with it plus an fp32 constant
    per 256 blocks and the 256-entry fp32 code (0.127 bit/weight, QLoRA paper section 3)."""
    blocks = math.ceil(n / BNB_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + absmax + 4 * 16  # + the 16-entry fp32 NF4/FP4 code


def linear_bytes(fmt: str, in_f: int, out_f: int, float_bytes: int, group: int | None = None,
                 double_quant: bool = True) -> int:
    """One linear layer's weight in a storage format (biases are counted with the float parameters)."""
    n = in_f * out_f
    if fmt == "float":
        return n * float_bytes
    if fmt in ("nf4", "fp4"):
        return bnb4_bytes(n, double_quant)
    if fmt in ("int8", "int8-dynamic"):
        return n + 4 * out_f  # int8 codes + an fp32 scale per output row (bnb SCB / compress's scales)
    base, _, low = fmt.partition("@")  # "gptq@3": a weight-only format below 4 bits
    if base in ("int8-weight", "int4-weight", "gptq", "awq"):
        bits = 8 if base == "int8-weight" else int(low or 4)
        groups = math.ceil(in_f / group) if group else 1
        codes = math.ceil(n * bits / 8)
        zeros = 0 if bits == 8 else out_f * groups  # uint8 zero points below 8 bits
        return codes + 4 * out_f * groups + zeros  # fp32 scales per (row, group)
    raise ValueError(f"unknown weight format {fmt!r}")


@dataclass
class Weights:
    """The model's weights as they are when a stage starts: float dtype, per-linear storage format."""

    shape: Shape
    dtype: str
    formats: dict[str, str]               # linear name -> format; missing means float
    group: dict[str, int | None]
    double_quant: bool = True
    lowrank: dict[str, int] | None = None  # linear name -> kept rank
    masked: int = 0                        # weights with a pruning mask (a bool per weight)

    @property
    def float_bytes(self) -> int:
        return BYTES[self.dtype]

    def linear_total(self) -> int:
        total = 0
        for name, (i, o) in self.shape.linears.items():
            rank = (self.lowrank or {}).get(name)
            if rank is not None:
                total += rank * (i + o) * self.float_bytes
            else:
                total += linear_bytes(self.formats.get(name, "float"), i, o, self.float_bytes,
                                      self.group.get(name), self.double_quant)
        return total

    def total(self) -> int:
        """Every weight, in its storage format, plus the pruning masks compress keeps with the model."""
        floats = (self.shape.other_params + self.shape.linear_bias) * self.float_bytes
        return floats + self.linear_total() + self.masked

    def quantized(self) -> bool:
        return any(f != "float" for f in self.formats.values())


def optimizer_bytes(optimizer: str, params: int, state_bytes: int) -> int:
    """AdamW keeps two states per parameter: torch's in the parameter's dtype, bitsandbytes' 8-bit ones
    as one byte each plus an fp32 absmax per 2048-value block. Paged optimizers allocate the same
    states in CUDA unified memory, which can spill to CPU RAM under pressure (counted on the GPU here)."""
    if optimizer.endswith("8bit"):
        return 2 * params + 2 * 4 * math.ceil(params / 2048)
    return 2 * params * state_bytes


def layer_activation_elements(shape: Shape, lora_dropout_targets: int = 0) -> int:
    """Tensors one decoder block saves for backward, per token (elements): the two norm inputs and
    outputs, q/k/v (after rotary) and the attention output that SDPA keeps, and the MLP's gate, up,
    activation and product. SDPA's fused kernels keep no seq x seq scores. A GPT-2 style MLP (no gate)
    saves the up projection and its activation instead."""
    h, i = shape.hidden, shape.intermediate
    mlp = 4 * i if _gated(shape) else 2 * i
    return 6 * h + 2 * shape.kv_dim + mlp + lora_dropout_targets * h


def _gated(shape: Shape) -> bool:
    # A gated MLP (Llama/Mistral/Qwen) has three linears per block; count them by name.
    return any(n.endswith(("gate_proj", "w1", "gate_up_proj")) for n in shape.linears)


def norm_extra_bytes(shape: Shape, act_bytes: int) -> int:
    """RMSNorm computes in fp32 (transformers' Llama norm): each of a block's two norms keeps an fp32
    tensor of the hidden size (the upcast input for 16-bit activations, the normalised product in fp32)."""
    return 2 * shape.hidden * 4


def logits_bytes(shape: Shape, tokens: int, act_bytes: int, training: bool) -> int:
    """A causal LM's logits over every position. Kept for backward: the head's output and the fp32
    log-softmax of transformers' loss. At the loss's peak also the fp32 upcast (for a 16-bit head) and,
    in backward, the logits' fp32 gradient."""
    if not shape.causal_lm:
        return 0
    per_token = act_bytes + 4
    if training:
        per_token += 4 + (4 if act_bytes < 4 else 0)
    return tokens * shape.vocab * per_token


def saved_activations(shape: Shape, batch: int, seq: int, act_bytes: int, checkpointing: bool,
                      lora_dropout_targets: int = 0) -> int:
    """What the forward pass keeps for backward: every block's saved tensors, or with transformers'
    (per-block) gradient checkpointing only each block's input; plus the logits."""
    tokens = batch * seq
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden * act_bytes
    else:
        kept = shape.layers * block_bytes(shape, batch, seq, act_bytes, lora_dropout_targets)
    if shape.hidden_dropout > 0:  # BERT-style embeddings: LayerNorm input, dropped output and its mask
        kept += tokens * shape.hidden * (2 * act_bytes + 1)
    return kept + logits_bytes(shape, tokens, act_bytes, training=False)


def block_bytes(shape: Shape, batch: int, seq: int, act_bytes: int, lora_dropout_targets: int = 0) -> int:
    """One block's saved tensors. Dropout (BERT-style models train with it) keeps each dropped tensor and
    its bool mask; attention dropout also forces SDPA to materialise the seq x seq probabilities."""
    tokens = batch * seq
    per_token = (layer_activation_elements(shape, lora_dropout_targets) * act_bytes
                 + norm_extra_bytes(shape, act_bytes))
    if shape.hidden_dropout > 0:
        per_token += 2 * shape.hidden * (act_bytes + 1)  # after attention and after the MLP
    if shape.attention_dropout > 0:
        per_token += shape.heads * seq * (2 * act_bytes + 1)  # softmax output, dropped copy, mask
    return tokens * per_token


def training_activations(shape: Shape, batch: int, seq: int, act_bytes: int, checkpointing: bool,
                         lora_dropout_targets: int = 0) -> int:
    """Peak activation memory of one training step: the saved tensors, the loss's transient logits
    copies, one block's activation gradients and, with checkpointing, the block being recomputed."""
    tokens = batch * seq
    block = block_bytes(shape, batch, seq, act_bytes, lora_dropout_targets)
    peak_logits = logits_bytes(shape, tokens, act_bytes, True) - logits_bytes(shape, tokens, act_bytes, False)
    return (saved_activations(shape, batch, seq, act_bytes, checkpointing, lora_dropout_targets)
            + peak_logits + block + (block if checkpointing else 0))


def inference_activations(shape: Shape, batch: int, seq: int, act_bytes: int, loss: bool) -> int:
    """Peak of a no-grad forward: one block's transient tensors (nothing is kept for backward) and the
    logits (upcast to fp32 for a loss)."""
    tokens = batch * seq
    block = tokens * (2 * shape.hidden + 2 * shape.kv_dim + 3 * shape.intermediate) * act_bytes
    upcast_and_log_softmax = (4 if act_bytes < 4 else 0) + 4 if loss else 0
    logits = tokens * shape.vocab * (act_bytes + upcast_and_log_softmax) if shape.causal_lm else 0
    return block + logits
