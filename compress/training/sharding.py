"""Which distributed sharding a training stage can use: FSDP / DeepSpeed asked for where they cannot
work are refused before any work, and weights left in shards after training are caught before a save.

compress saves, checkpoints and masks whole weights on every process; sharding that partitions the
weights themselves (FSDP, DeepSpeed ZeRO-3) is therefore refused until their consolidation is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.training.loop import TrainingFields


def _env_on(name: str) -> bool:
    """An accelerate config's flag in the environment (`accelerate launch --config_file` sets them)."""
    import os

    return os.environ.get(name, "").lower() in ("1", "true")


def sharding_problems(settings: TrainingFields, device: str, four_bit: bool = False) -> list[str]:
    """FSDP / DeepSpeed asked for where they cannot run: refused before any work, never silently
    replaced by plain data parallelism. They come from the stage's fields, the recipe's `distributed`
    section, or the accelerate config that `accelerate launch --config_file` passes on in the environment."""
    wanted = [name for name, field, env in (("FSDP", settings.fsdp, "ACCELERATE_USE_FSDP"),
                                            ("DeepSpeed", settings.deepspeed, "ACCELERATE_USE_DEEPSPEED"))
              if field is not None or _env_on(env)]
    if not wanted:
        return []
    key = "fsdp" if settings.fsdp is not None else "deepspeed" if settings.deepspeed is not None else None
    from_recipe = settings._sharding_from == "distributed"
    source = ("the recipe's distributed section" if from_recipe else "this stage") if key else "the accelerate config"
    fix = (f"remove {'distributed.' if from_recipe else ''}{key}" if key
           else "launch without that accelerate config")
    sharded = weight_sharding(settings)
    if sharded is not None:
        # Measured on CPU with torch's fully_shard (what accelerate's FSDP2 applies): after training, a
        # rank-0 save_pretrained of the sharded weights fails ("invalid python storage"); compress's
        # mid-stage checkpoints and pruning masks also assume whole weights on every process.
        return [(f"{key or 'type'}: {sharded} (from {source}) shards the weights themselves, and compress cannot yet "
                f"gather sharded weights back into a stage's Hugging Face folder (nor checkpoint or mask them) — "
                f"{fix}; on several GPUs train with plain data parallelism (torchrun, or accelerate launch "
                f"--multi_gpu) or DeepSpeed ZeRO-1/2, which keep whole weights on every GPU")]
    if device != "cuda":
        return [(f"{key or 'type'}: {' and '.join(wanted)} (from {source}) shards training across GPUs, but this "
                f"run trains on {device}; processes launched with torchrun on CPU train with plain data "
                f"parallelism (gloo) — {fix}, or run on GPUs")]
    if four_bit:
        # Sharding bitsandbytes' packed uint8 weights needs bnb_4bit_quant_storage set to the training
        # dtype at load time (the FSDP-QLoRA recipe); compress loads NF4 with uint8 storage, which
        # FSDP would flatten with the float adapters and DeepSpeed ZeRO-3 would partition as bytes.
        return [(f"{key or 'type'}: {' and '.join(wanted)} (from {source}) cannot shard a 4-bit "
                f"(bitsandbytes) base as compress loads it; train QLoRA with plain data parallelism "
                f"(torchrun, one copy of the 4-bit base per GPU) — {fix}")]
    return []


def weight_sharding(settings: TrainingFields) -> str | None:
    """The requested sharding that partitions the weights themselves (FSDP's sharding strategies,
    DeepSpeed ZeRO-3), from the stage/recipe or the accelerate config in the environment, or None."""
    import json
    import os

    env = os.environ
    if settings.fsdp is not None or _env_on("ACCELERATE_USE_FSDP"):
        strategy = str((settings.fsdp or {}).get("sharding_strategy") or env.get("FSDP_SHARDING_STRATEGY", ""))
        version = str((settings.fsdp or {}).get("fsdp_version") or env.get("FSDP_VERSION", "1"))
        if not (version == "1" and strategy.upper() in ("NO_SHARD", "3")):  # FSDP2 always shards
            return "FSDP"
    stage = None
    if settings.deepspeed is not None:
        stage = (settings.deepspeed.get("zero_optimization") or {}).get("stage")
    elif _env_on("ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if stage is None and config_file and os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as fh:
                stage = (json.load(fh).get("zero_optimization") or {}).get("stage")
    return "DeepSpeed ZeRO-3" if str(stage) == "3" else None


def sharded_weights(model: Any) -> str | None:
    """Which parameter is held in shards across processes (FSDP's DTensor, a ZeRO-3 partition), or None."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            return f"parameter {name} is an FSDP shard (DTensor {tuple(param.to_local().shape)} of {tuple(param.shape)})"
        if getattr(param, "ds_numel", None) not in (None, param.numel()):
            return f"parameter {name} is a DeepSpeed ZeRO-3 partition ({param.numel()} of {param.ds_numel} values)"
    return None
