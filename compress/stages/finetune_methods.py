"""The finetune stage's methods: one small config and one handler each, registered in one line.

Every adapter method goes through peft. A handler states what its method can do, and the stage
checks it before any work: whether it merges into the weights (prompt/prefix/P-tuning learn inputs,
not a weight update, so they keep the adapter), how it keeps a pruned base's zeros (masked additive
update, a multiplicative one that cannot move a zero, a frozen base, or refused with the reason) and
whether peft trains it on bitsandbytes 4-bit layers. peft has no bottleneck (Houlsby) adapter in
this version (0.21), so none is offered.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from compress.pruning.targets import is_conv1d
from compress.stages.finetune import FINETUNE_METHODS, AdapterMethod, Finetune
from compress.training import adapters as ad


def _task_type(task: str) -> Any:
    from peft import TaskType

    return TaskType.SEQ_CLS if task == "sequence-classification" else TaskType.CAUSAL_LM


def _linear_targets(model: Any, config: Any) -> list[str]:
    # Full module names, not short ones: a short name like `dense` can also live inside a head.
    return config.target_modules or sorted(ad.linear_layers(model))


TargetField = Field(None, description="Module names to adapt; default: every linear layer except the "
                                      "output/classifier head.")


# ------------------------------------------------------------------------------- LoRA family


class Lora(Finetune):
    """LoRA: a low-rank update B·A added to each adapted linear layer (merges; masked on a pruned base)."""

    method: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha/r).")
    # 0 by default (as torchtune does): peft draws a separate dropout mask for every adapted layer,
    # and on CPU those random draws made a LoRA step 60% slower than with no dropout (measured on
    # MiniLM, batch 32: 1170 vs 737 ms) -- slower than full fine-tuning.
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (costs ~60% more "
                                                        "time per step on CPU).")
    target_modules: list[str] | None = TargetField


class Dora(Lora):
    """DoRA: LoRA with a learned per-column magnitude (merges; refused on a pruned base)."""

    method: Literal["dora"] = "dora"  # type: ignore[assignment]


class Qlora(Lora):
    """QLoRA: LoRA on the base reloaded in NF4 4-bit for training (merges)."""

    method: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    double_quant: bool = Field(True, description="Also quantize the 4-bit scales (saves ~0.4 bit/weight).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit layers compute in (float32 on CPU).")


def _lora_config(config: Lora, model: Any, task: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=_linear_targets(model, config), modules_to_save=config.modules_to_save,
                      use_dora=config.method == "dora", task_type=_task_type(task))


def _merge_lora(model: Any, masks: dict[str, Any], requantize: bool) -> Any:
    return ad.merge_lora(model, masks, requantize=requantize)


def _merge_dora(model: Any, masks: dict[str, Any], requantize: bool) -> Any:
    from compress.quant.bnb_weights import unpack_cpu_layout

    # DoRA's merge rescales by the column norms; peft's own merge does it (and requantizes bnb layers).
    # peft reads 4-bit weights in bitsandbytes' canonical layout only (see quant/bnb_weights).
    unpack_cpu_layout(model)
    merged = model.merge_and_unload()
    return merged if requantize else ad.dequantize_all(merged)


def _check_qlora(bundle: Any, config: Any, ctx: Any, quantized: bool) -> list[str]:
    model = bundle.model
    if quantized:
        return [("method: the model is already quantized by an earlier stage; use method: lora "
                "(it trains adapters on the quantized base)")]
    if conv := sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_conv1d(m)}):
        # transformers' 4-bit loader keeps Conv1D's (in, out) checkpoint layout against the
        # (out, in) Linear4bit it builds, and refuses the size mismatch (transformers 5.24).
        return [(f"method: qlora reloads the base in 4-bit, which transformers cannot do for "
                f"Conv1D layers ({', '.join(conv)}: weights stored transposed); use method: lora")]
    if (why := ad.bnb_4bit_problem(ctx.device)) is not None:
        return [(f"method: qlora needs bitsandbytes 4-bit on {ctx.device}, which fails here ({why}); "
                f"install a bitsandbytes build for this device (>=0.46 for CPU) or use method: lora")]
    return []


# ------------------------------------------------------------------------------- full fine-tuning


class Full(Finetune):
    """Full fine-tuning: every weight trains (a pruned base is re-masked after every step)."""

    method: Literal["full"] = "full"

    @model_validator(mode="after")
    def _no_adapter(self) -> Full:
        if self.merge not in (None, "merge"):
            raise ValueError(f"merge: full fine-tuning has no adapter to merge ({self.merge!r}); remove merge")
        if self.save_adapter:
            raise ValueError("save_adapter: full fine-tuning has no adapter; remove save_adapter")
        return self


def _check_full(bundle: Any, config: Any, ctx: Any, quantized: bool) -> list[str]:
    return ["method: full fine-tuning cannot update quantized weights; use method: lora"] if quantized else []


# ------------------------------------------------------------------------------- IA³, LoHa, LoKr, VeRA


class IA3(Finetune):
    """IA³: learned per-channel scales on keys, values and the feed-forward input (merges; keeps zeros)."""

    method: Literal["ia3"] = "ia3"
    # IA³ trains only per-channel scales (0.07% of MiniLM), which move far less per step than LoRA's
    # matrices: at the shared default 2e-4 (and at its paper's 3e-3) it barely trains in a short run.
    # On MiniLM tweets, 2,000 examples, 63 steps, lr 3e-3 gave 55.75% vs LoRA's 70.45%; 3e-2 was chosen
    # on another split (reports/finetune.md, tuning table) -- as peft's IA³ examples use 1e-2..3e-2.
    lr: float = Field(3e-2, gt=0, description="Peak learning rate (IA³'s own default, far above LoRA's: it "
                                              "trains only scaling vectors).")
    target_modules: list[str] | None = Field(
        None, description="Modules whose activations are rescaled; default: peft's choice for the "
                          "architecture (keys, values and the feed-forward output projection).")
    feedforward_modules: list[str] | None = Field(
        None, description="Of target_modules, those scaled on their input (feed-forward layers) rather than "
                          "their output; needed with target_modules.")

    @model_validator(mode="after")
    def _feedforward_in_targets(self) -> IA3:
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ValueError("feedforward_modules: needs target_modules (of which it is a subset); set both")
        if self.target_modules is not None and self.feedforward_modules is None:
            raise ValueError("feedforward_modules: required with target_modules (which of them are feed-forward "
                             "layers, scaled on their input); use [] if none")
        if extra := sorted(set(self.feedforward_modules or []) - set(self.target_modules or [])):
            raise ValueError(f"feedforward_modules: {extra} not in target_modules; list them there too")
        return self


def _ia3_config(config: IA3, model: Any, task: str) -> Any:
    from peft import IA3Config

    return IA3Config(target_modules=config.target_modules, feedforward_modules=config.feedforward_modules,
                     modules_to_save=config.modules_to_save, task_type=_task_type(task))


def _check_ia3(bundle: Any, config: Any, ctx: Any, quantized: bool) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(bundle.model.config, "model_type", None)
    if config.target_modules is None and model_type not in DEFAULTS:
        return [(f"target_modules: peft has no default IA³ targets for {model_type!r}; set target_modules and "
                f"feedforward_modules (candidates: {', '.join(ad.default_targets(bundle.model))})")]
    return []


class LoHa(Finetune):
    """LoHa: a Hadamard product of two low-rank updates (merges; masked on a pruned base; no 4-bit)."""

    method: Literal["loha"] = "loha"
    rank: int = Field(8, gt=0, description="Rank of each of the two low-rank factors.")
    alpha: float = Field(8.0, gt=0, description="Scaling alpha (the update is scaled by alpha/r).")
    target_modules: list[str] | None = TargetField


class LoKr(Finetune):
    """LoKr: a Kronecker product of a small matrix and a low-rank one (merges; masked on a pruned base;
    no 4-bit)."""

    method: Literal["lokr"] = "lokr"
    rank: int = Field(8, gt=0, description="Rank of the low-rank Kronecker factor.")
    alpha: float = Field(8.0, gt=0, description="Scaling alpha (the update is scaled by alpha/r).")
    decompose_factor: int = Field(-1, description="Kronecker factorisation factor; -1 picks the most square one.")
    target_modules: list[str] | None = TargetField


def _loha_config(config: LoHa, model: Any, task: str) -> Any:
    from peft import LoHaConfig

    return LoHaConfig(r=config.rank, alpha=config.alpha, target_modules=_linear_targets(model, config),
                      modules_to_save=config.modules_to_save, task_type=_task_type(task))


def _lokr_config(config: LoKr, model: Any, task: str) -> Any:
    from peft import LoKrConfig

    return LoKrConfig(r=config.rank, alpha=config.alpha, decompose_factor=config.decompose_factor,
                      target_modules=_linear_targets(model, config), modules_to_save=config.modules_to_save,
                      task_type=_task_type(task))


def _check_lycoris(bundle: Any, config: Any, ctx: Any, quantized: bool) -> list[str]:
    # peft's LoHa/LoKr layers wrap torch's Linear/Conv only: GPT-2's Conv1D is refused by peft.
    if conv := sorted({n.rsplit(".", 1)[-1] for n, m in bundle.model.named_modules() if is_conv1d(m)}):
        return [(f"method: peft's {config.method} adapts torch.nn.Linear only, and this model's projections are "
                f"Conv1D ({', '.join(conv)}); use method: lora or ia3")]
    return []


class Vera(Finetune):
    """VeRA: frozen shared random projections, trained per-layer scaling vectors (merges; masked on a pruned
    base; no 4-bit)."""

    method: Literal["vera"] = "vera"
    rank: int = Field(256, gt=0, description="Rank of the shared random projections (peft's default 256).")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the trained scaling vector d.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = TargetField


def _vera_config(config: Vera, model: Any, task: str) -> Any:
    from peft import VeraConfig

    # save_projection (peft's default): the random projections are saved with the adapter, so it
    # reloads exactly without relying on the PRNG.
    return VeraConfig(r=config.rank, d_initial=config.d_initial, vera_dropout=config.dropout,
                      target_modules=_linear_targets(model, config), modules_to_save=config.modules_to_save,
                      save_projection=True, task_type=_task_type(task))


# ------------------------------------------------------------------------------- prompt learning

NO_MERGE_PROMPT = ("{method} learns virtual tokens fed to the model, not a change of its weights, so there is "
                   "nothing to merge; use merge: none (the adapter is kept and saved in PEFT format)")


class _PromptLearning(Finetune):
    num_virtual_tokens: int = Field(20, gt=0, description="Number of learned virtual tokens.")

    @model_validator(mode="after")
    def _cannot_merge(self) -> _PromptLearning:
        if self.merge not in (None, "none"):
            raise ValueError(f"merge: {self.merge!r} is impossible: " + NO_MERGE_PROMPT.format(method=self.method))
        return self


class PromptTuning(_PromptLearning):
    """Prompt tuning: learned input embeddings prepended to every input (cannot merge; base untouched)."""

    method: Literal["prompt-tuning"] = "prompt-tuning"


class PrefixTuning(_PromptLearning):
    """Prefix tuning: learned keys/values prepended in every attention layer (cannot merge; decoders only)."""

    method: Literal["prefix-tuning"] = "prefix-tuning"
    prefix_projection: bool = Field(False, description="Reparameterise the prefix through a two-layer MLP.")
    encoder_hidden_size: int = Field(128, gt=0, description="Hidden size of that MLP (prefix_projection only).")


class PTuning(_PromptLearning):
    """P-tuning: virtual tokens produced by a small trained prompt encoder (cannot merge; base untouched)."""

    method: Literal["p-tuning"] = "p-tuning"
    encoder_type: Literal["MLP", "LSTM"] = Field("MLP", description="The prompt encoder's architecture.")
    encoder_hidden_size: int = Field(128, gt=0, description="Hidden size of the prompt encoder.")


def _prompt_config(config: PromptTuning, model: Any, task: str) -> Any:
    from peft import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, modules_to_save=config.modules_to_save,
                              task_type=_task_type(task))


def _prefix_config(config: PrefixTuning, model: Any, task: str) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prefix_projection=config.prefix_projection,
                              encoder_hidden_size=config.encoder_hidden_size, modules_to_save=config.modules_to_save,
                              task_type=_task_type(task))


def _ptuning_config(config: PTuning, model: Any, task: str) -> Any:
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(num_virtual_tokens=config.num_virtual_tokens, encoder_hidden_size=config.encoder_hidden_size,
                               encoder_reparameterization_type=config.encoder_type,
                               modules_to_save=config.modules_to_save, task_type=_task_type(task))


def _check_prefix(bundle: Any, config: Any, ctx: Any, quantized: bool) -> list[str]:
    import inspect

    # peft feeds the prefix as past key values, which only a decoder attends to (peft would fail mid-run
    # on BERT). transformers 5.24 renamed the argument `cache`, and BertModel takes one too (for its
    # decoder use), so the signature alone no longer tells an encoder apart: the task or config does.
    model = bundle.model
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    takes = any({"past_key_values", "cache"} & set(inspect.signature(m.forward).parameters) for m in (model, backbone))
    decoder = bundle.task == "causal-lm" or bool(getattr(model.config, "is_decoder", False))
    if not (takes and decoder):
        return [(f"method: prefix-tuning feeds learned keys/values as past key values, which "
                f"{type(model).__name__} does not take; use method: prompt-tuning or p-tuning")]
    return []


# ------------------------------------------------------------------------------- registration

NO_4BIT_LYCORIS = ("peft's {method} wraps bitsandbytes layers as if they were float Linear layers (its merge would "
                   "write float values into packed 4-bit storage); use method: lora or ia3 on a quantized base")
PRUNED_DORA = ("DoRA rescales whole weight columns, so it cannot keep the pruned weights at zero; use method: lora "
               "(masked LoRA keeps the sparsity)")

_lora = AdapterMethod(_lora_config, _merge_lora, pruned="masked")
FINETUNE_METHODS.register(Lora, _lora)
FINETUNE_METHODS.register(Dora, AdapterMethod(_lora_config, _merge_dora, pruned=PRUNED_DORA))
FINETUNE_METHODS.register(Qlora, AdapterMethod(_lora_config, _merge_lora, pruned="masked", loads_4bit=True,
                                               check=_check_qlora))
FINETUNE_METHODS.register(Full, AdapterMethod(None, None, pruned="full", check=_check_full))
FINETUNE_METHODS.register(IA3, AdapterMethod(
    _ia3_config, lambda model, masks, requantize: model.merge_and_unload(), pruned="keeps", check=_check_ia3,
    no_merge_4bit="peft cannot merge IA³ into a 4-bit base (IA3Model refuses it)"))
FINETUNE_METHODS.register(LoHa, AdapterMethod(
    _loha_config, lambda model, masks, requantize: ad.merge_with_peft(model, masks), pruned="masked",
    no_4bit=NO_4BIT_LYCORIS.format(method="LoHa"), check=_check_lycoris))
FINETUNE_METHODS.register(LoKr, AdapterMethod(
    _lokr_config, lambda model, masks, requantize: ad.merge_with_peft(model, masks), pruned="masked",
    no_4bit=NO_4BIT_LYCORIS.format(method="LoKr"), check=_check_lycoris))
FINETUNE_METHODS.register(Vera, AdapterMethod(
    _vera_config, lambda model, masks, requantize: ad.merge_with_peft(model, masks), pruned="masked",
    no_4bit="peft's VeRA adapts torch Linear and Conv1D layers only, not bitsandbytes ones; use method: lora or ia3"))
for _cls, _build, _check in ((PromptTuning, _prompt_config, None), (PrefixTuning, _prefix_config, _check_prefix),
                             (PTuning, _ptuning_config, None)):
    FINETUNE_METHODS.register(_cls, AdapterMethod(
        _build, None, pruned="untouched", check=_check,
        cannot_merge=NO_MERGE_PROMPT.format(method=_cls.model_fields["method"].default)))

__all__ = ["IA3", "Dora", "Full", "LoHa", "LoKr", "Lora", "PTuning", "PrefixTuning", "PromptTuning", "Qlora", "Vera"]
