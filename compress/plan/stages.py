"""Per-stage peak memory per device: what each stage holds at its busiest moment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.plan.memory import (
    BYTES,
    Weights,
    inference_activations,
    linear_bytes,
    optimizer_bytes,
    training_activations,
)
from compress.plan.shapes import Shape

CALIBRATION_BATCH = 8  # compress.pruning.calibration.calibration_batches' batch size


@dataclass
class Sharding:
    """How training state is split over `world_size` devices: none (DDP: a full copy each), zero2
    (gradients and optimizer states sharded), zero3 / fsdp (weights too)."""

    world_size: int = 1
    mode: str = "none"

    def split(self, n: int, kind: str) -> int:
        """`n` bytes of `kind` (weights / gradients / optimizer) as one device holds them."""
        sharded = {"none": (), "zero2": ("gradients", "optimizer"),
                   "zero3": ("weights", "gradients", "optimizer"), "fsdp": ("weights", "gradients", "optimizer")}
        return -(-n // self.world_size) if kind in sharded[self.mode] else n


@dataclass
class StagePlan:
    label: str
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


@dataclass
class Setting:
    """Run-wide facts each stage estimate needs."""

    device: str              # cpu | cuda
    seq: int                 # data.max_length
    calibration_samples: int


def stage_sharding(stage: Any, default: Sharding) -> Sharding:
    """A stage's own `deepspeed` / `fsdp` settings name its sharding; the CLI flags otherwise."""
    ds = getattr(stage, "deepspeed", None)
    if ds is not None and default.mode == "none":
        zero = int((ds.get("zero_optimization") or {}).get("stage", 0) or 0)
        return Sharding(default.world_size, {3: "zero3", 2: "zero2", 1: "zero2"}.get(zero, "none"))
    fsdp = getattr(stage, "fsdp", None)
    if fsdp is not None and default.mode == "none":
        strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
        return Sharding(default.world_size, "zero2" if "GRAD_OP" in strategy else "fsdp")
    return default


def _act_bytes(stage: Any, weights: Weights, setting: Setting) -> int:
    """Activation width: on a GPU compress trains under autocast (bf16 when the GPU has it, else fp16,
    or as `mixed_precision` says); on CPU it trains in the weights' own dtype (QLoRA: compute_dtype)."""
    mp = getattr(stage, "mixed_precision", "auto")
    if setting.device == "cuda" and mp != "no":
        return 2
    if getattr(stage, "method", None) == "qlora":
        return BYTES[stage.compute_dtype]
    return weights.float_bytes


def _adapter_trainable(stage: Any, targets: dict[str, tuple[int, int]], shape: Shape) -> tuple[int, str]:
    """Trainable parameters a finetune method adds (head excluded), and how they were counted."""
    method, rank = stage.method, getattr(stage, "rank", 0)
    tokens = getattr(stage, "num_virtual_tokens", 0)
    where = f"on {len(targets)} linear layers"
    if method in ("lora", "dora", "qlora"):
        n = sum(rank * (i + o) for i, o in targets.values())
        if method == "dora":
            n += sum(o for _, o in targets.values())  # one magnitude per output row
        return n, f"rank {rank} {where}"
    if method == "loha":
        return sum(2 * rank * (i + o) for i, o in targets.values()), f"two rank-{rank} pairs {where}"
    if method == "lokr":  # a small Kronecker factor plus a rank-r one: at most a rank-r LoRA's count
        return sum(rank * (i + o) for i, o in targets.values()), f"at most rank {rank} {where}"
    if method == "vera":
        return sum(rank + o for _, o in targets.values()), f"scaling vectors (r={rank} + out) {where}"
    kv = shape.hidden * shape.kv_heads // max(shape.heads, 1)
    if method == "ia3":  # peft's default targets for decoders: keys, values, feed-forward down projection
        return shape.layers * (2 * kv + shape.intermediate), "one scale per channel (peft's default targets)"
    if method == "prefix-tuning":
        return tokens * shape.layers * 2 * kv, f"{tokens} key/value tokens per layer"
    if method == "p-tuning":
        enc = stage.encoder_hidden_size
        mlp = (shape.hidden + 1) * enc + (enc + 1) * enc + (enc + 1) * shape.hidden
        return tokens * shape.hidden + mlp, f"{tokens} tokens + MLP prompt encoder"
    return tokens * shape.hidden, f"{tokens} virtual tokens"


def plan_training(label: str, stage: Any, weights: Weights, shape: Shape, setting: Setting,
                  sharding: Sharding) -> StagePlan:
    """Finetune (LoRA / DoRA / QLoRA / full) or a distill student: weights, trainable state, activations."""
    plan = StagePlan(label)
    method = getattr(stage, "method", "full")
    if method == "qlora":
        weights = Weights(shape, weights.dtype, dict.fromkeys(shape.linears, "nf4"), {},
                          double_quant=stage.double_quant, masked=weights.masked)
        plan.notes.append(f"base linears in NF4 ({'double-quantized' if stage.double_quant else 'fp32'} "
                          f"absmax), the rest in {weights.dtype}")
    plan.parts["weights"] = sharding.split(weights.total(), "weights")
    if method == "full":
        trainable, state = shape.total, weights.float_bytes
        grads = trainable * state
        if sharding.mode == "zero3" and state < 4:
            # DeepSpeed's bf16/fp16 optimizer keeps an fp32 master copy of every weight.
            plan.parts["fp32 master weights"] = sharding.split(trainable * 4, "optimizer")
            state = 4
    else:
        targets = shape.matching(getattr(stage, "target_modules", None))
        trainable, what = _adapter_trainable(stage, targets, shape)
        trainable += shape.trained_in_full(stage.modules_to_save)
        # peft (autocast_adapter_dtype, its default) keeps adapters in fp32 over a 16-bit base.
        state = 4
        plan.parts["adapters"] = trainable * 4
        grads = trainable * 4
        plan.notes.append(f"{method}: {what} = {trainable:,} trainable parameters (fp32)")
    plan.parts["gradients"] = sharding.split(grads, "gradients")
    plan.parts["optimizer"] = sharding.split(optimizer_bytes(stage.optimizer, trainable, state), "optimizer")
    if stage.optimizer.startswith("paged"):
        plan.notes.append(f"{stage.optimizer}: its states can page out to CPU RAM when the GPU is full")
    if sharding.mode in ("zero3", "fsdp") and sharding.world_size > 1:
        # A sharded block is gathered whole for its forward/backward (and the next one prefetched).
        plan.parts["gathered block"] = 2 * shape.block_params * weights.float_bytes
    act = _act_bytes(stage, weights, setting)
    dropout_inputs = len(shape.matching(getattr(stage, "target_modules", None))) // max(shape.layers, 1) \
        if getattr(stage, "dropout", 0) and method != "full" else 0
    plan.parts["activations"] = training_activations(shape, stage.batch_size, setting.seq, act,
                                                     stage.gradient_checkpointing, dropout_inputs)
    plan.notes.append(f"activations: batch {stage.batch_size} x {setting.seq} tokens, {act}-byte, gradient "
                      f"checkpointing {'on' if stage.gradient_checkpointing else 'off'}")
    if sharding.world_size > 1:
        plan.notes.append(f"{sharding.mode} over {sharding.world_size} devices")
    return plan


def plan_prune(label: str, stage: Any, weights: Weights, shape: Shape, setting: Setting) -> tuple[StagePlan, int]:
    """Prune: the model, the masks it adds, and the calibration working set of its method."""
    plan = StagePlan(label)
    plan.parts["weights"] = weights.total()
    act = weights.float_bytes
    n = stage.calibration_samples or setting.calibration_samples
    masked = 0
    if stage.structure in ("unstructured", "n:m"):
        chosen = shape.selected(stage.targets, stage.ignore) or shape.linears
        masked = sum(i * o for i, o in chosen.values())  # a bool mask per weight of every pruned layer
        plan.parts["masks"] = masked
        if stage.method == "sparsegpt":
            # Block after block: the block's captured inputs (and the next block's), and the Hessians
            # of its linears in fp32, plus one layer's fp32 weight, its inverse Hessian and error.
            per_block = {}
            for name, (i, o) in chosen.items():
                block = name.rsplit(".", 2)[0]
                per_block[block] = per_block.get(block, 0) + i * i * 4
            largest_in, largest_out = max(chosen.values(), key=lambda s: s[0] * s[1])
            plan.parts["block inputs"] = 2 * n * setting.seq * shape.hidden * act
            plan.parts["hessians"] = max(per_block.values(), default=0)
            plan.parts["layer workspace"] = 3 * largest_in * largest_out * 4 + largest_in * largest_in * 4
        elif stage.method == "wanda":
            plan.parts["calibration forward"] = inference_activations(
                shape, CALIBRATION_BATCH, setting.seq, act, loss=False)
        i, o = max(chosen.values(), key=lambda s: s[0] * s[1])
        plan.parts.setdefault("layer workspace", 2 * i * o * 4)  # the fp32 score and its sort of one layer
    else:
        importance = stage.ranking()
        if importance == "taylor":
            plan.parts["gradients"] = shape.total * weights.float_bytes
            plan.parts["calibration forward"] = training_activations(
                shape, CALIBRATION_BATCH, setting.seq, act, checkpointing=False)
        elif importance == "activation":
            plan.parts["calibration forward"] = inference_activations(
                shape, CALIBRATION_BATCH, setting.seq, act, loss=False)
        plan.notes.append("structured: planned on the unpruned shapes (the pruned model is smaller)")
    return plan, masked


def plan_quantize(label: str, stage: Any, weights: Weights, shape: Shape,
                  setting: Setting) -> tuple[StagePlan, dict[str, str], dict[str, int | None]]:
    """Quantize: the float model, its quantized copy, and GPTQ's Hessians (all collected in one pass)."""
    plan = StagePlan(label)
    group = getattr(stage, "group_size", None)
    if group is None:
        group = 0 if stage.scheme == "int8-weight" else 128
    bits = getattr(stage, "bits", 4)
    fmt = stage.scheme if bits == 4 else f"{stage.scheme}@{bits}"
    if stage.scheme == "mixed":
        # Widths are chosen at run time; planned at the integer width nearest the budget.
        bits = min(stage.candidate_bits, key=lambda b: abs(b - stage.avg_bits))
        fmt = "gptq" if bits == 4 else ("int8-weight" if bits == 8 else f"gptq@{bits}")
    layers = shape.selected(stage.include, stage.exclude)
    if not layers:
        plan.parts["weights"] = weights.total()
        plan.notes.append("include / exclude leave no linear layer to quantize")
        return plan, dict(weights.formats), dict(weights.group)
    formats = {**weights.formats, **dict.fromkeys(layers, fmt)}
    groups = {**weights.group, **dict.fromkeys(layers, group or None)}
    plan.parts["weights"] = weights.total()
    double_quant = getattr(stage, "double_quant", True)
    quantized = sum(linear_bytes(fmt, i, o, weights.float_bytes, group or None, double_quant)
                    for i, o in layers.values())
    if stage.scheme in ("int8", "nf4", "fp4"):
        # transformers' bitsandbytes loader builds the quantized model beside the float one.
        plan.parts["quantized copy"] = quantized + (shape.other_params + shape.linear_bias) * weights.float_bytes
    else:
        i, o = max(layers.values(), key=lambda s: s[0] * s[1])
        plan.parts["layer workspace"] = 2 * i * o * 4
    n = stage.calibration_samples or setting.calibration_samples
    if stage.scheme in ("gptq", "awq", "mixed"):
        # compress.calibration collects every layer's Hessian in float64 in one pass.
        plan.parts["hessians (float64)"] = sum(i * i * 8 for i, _ in layers.values())
        plan.parts["calibration forward"] = inference_activations(shape, 1, setting.seq, weights.float_bytes,
                                                                  loss=False)
        plan.notes.append(f"{stage.scheme}: {n} calibration sequences, Hessians of {len(layers)} layers held "
                          f"at once")
        if stage.scheme == "mixed":
            plan.notes.append("mixed: planned at one width; every layer's candidate widths are held packed until "
                              "the assignment, and sensitivity fisher adds a backward pass (activation "
                              "gradients only)")
    elif stage.scheme == "int8-dynamic" and stage.smooth_alpha is not None:
        plan.parts["calibration forward"] = inference_activations(shape, 1, setting.seq, weights.float_bytes,
                                                                  loss=False)
    return plan, formats, groups


def plan_lowrank(label: str, stage: Any, weights: Weights, shape: Shape) -> tuple[StagePlan, dict[str, int]]:
    """Low-rank: the model plus the SVD of the largest layer in fp32 (W, U, S, Vh)."""
    plan = StagePlan(label)
    plan.parts["weights"] = weights.total()
    chosen = shape.selected(stage.targets, stage.ignore) or shape.linears
    i, o = max(chosen.values(), key=lambda s: s[0] * s[1])
    k = min(i, o)
    plan.parts["svd workspace"] = (i * o + o * k + k * i + k) * 4
    kept: dict[str, int] = {}
    if stage.rank is not None:
        kept = {n: stage.rank for n, (a, b) in chosen.items()
                if not stage.skip_if_larger or stage.rank * (a + b) < a * b}
    else:
        plan.notes.append("energy: the kept ranks depend on the weights; later stages are planned dense")
    return plan, kept
