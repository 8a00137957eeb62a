"""Fine-tuning stage: peft adapters (methods in compress/stages/finetune_methods.py) or full fine-tuning,
on the shared loop.

Merge policies: `none` keeps the adapter (saved in PEFT format next to the base), `merge` folds it
into float weights, `dequantize-merge-requantize` folds it into a bitsandbytes base and checks the
result is still quantized. Methods that cannot merge (prompt/prefix/P-tuning) keep the adapter. A
pruned base stays pruned: additive updates are masked, IA³ scales (a zero stays zero), prompt
methods leave the weights alone, and the zeros are checked after the merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from compress.bundle import ModelBundle, ModelFormat, from_pretrained_checked, register_format
from compress.context import RunContext
from compress.errors import StageError
from compress.evaluate.size import count_parameters
from compress.methods import FamilyConfig, MethodFamily
from compress.quant import bnb as bnb_quant
from compress.registry import StageResult, register_stage
from compress.training import TrainingFields
from compress.training import adapters as ad
from compress.training.entry import held_out_evaluator, train_in_stage
from compress.training.loop import apply_masks
from compress.training.sharding import sharding_problems

MergePolicy = Literal["none", "merge", "dequantize-merge-requantize"]


class Finetune(FamilyConfig, TrainingFields):
    """Fine-tune on the recipe's training data: peft adapters (LoRA, DoRA, QLoRA, IA³, LoHa, LoKr, VeRA,
    prompt/prefix/P-tuning) or all weights. Each method's own fields: compress/stages/finetune_methods.py."""

    type: Literal["finetune"] = "finetune"
    method: str = Field(
        "lora", description="lora, dora, qlora, full, ia3, loha, lokr, vera, prompt-tuning, prefix-tuning or "
                            "p-tuning (each method's own fields: `compress stages`).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full next to the adapters; a classifier head is always included."
    )
    merge: MergePolicy | None = Field(
        None, description="none (keep the adapter), merge (into float weights), or dequantize-merge-requantize "
                          "(into a quantized base, kept quantized; checked, and refused when re-rounding to "
                          "4-bit loses too much of the update). Default: the latter when an earlier stage "
                          "quantized the base, else merge (QLoRA included: its 4-bit base is a training-time "
                          "saving, and the float merge is exactly the model it trained); none for methods "
                          "that cannot merge (prompt/prefix/P-tuning).")
    save_adapter: bool = Field(False, description="Also write the trained adapter (PEFT format) to "
                                                  "<output_dir>/adapters/<stage folder>/.")


MergeFn = Callable[[Any, dict[str, torch.Tensor], bool], Any]


@dataclass(frozen=True)
class AdapterMethod:
    """What one finetune method does and can do (the handler registered with its config).

    `pruned` says how a pruned base keeps its zeros: "masked" (an additive update, masked in the
    forward and at the merge), "keeps" (a multiplicative update cannot move a zero), "untouched" (the
    weights are frozen and unchanged), "full" (re-masked after every step), or anything else: the
    reason the method is refused on a pruned base."""

    peft_config: Callable[[Any, Any, str], Any] | None  # (config, model, task) -> peft config; None: full
    merge: MergeFn | None  # (peft model, masks, requantize) -> merged model; None: cannot merge
    pruned: str = "masked"
    cannot_merge: str = ""  # why merge is impossible (when merge is None)
    no_4bit: str | None = None  # why peft cannot train it on a bitsandbytes base (None: it can)
    no_merge_4bit: str | None = None  # why it cannot merge into a bitsandbytes base (None: it can)
    loads_4bit: bool = False  # reloads the base in NF4 for training (QLoRA)
    check: Callable[[ModelBundle, Any, RunContext, bool], list[str]] | None = None  # method's own checks

    @property
    def adapter(self) -> bool:
        return self.peft_config is not None


FINETUNE_METHODS = MethodFamily(Finetune, "method", default="lora")


def method_of(config: Finetune) -> AdapterMethod:
    """The registered handler of a finetune config's method."""
    return FINETUNE_METHODS.handler(config)  # type: ignore[return-value]


def default_policy(config: Finetune, quantized: bool) -> MergePolicy:
    """The merge policy when the recipe names none (see Finetune.merge)."""
    if config.merge:
        return config.merge
    method = method_of(config)
    if not method.adapter:
        return "merge"
    if method.merge is None or (quantized and method.no_merge_4bit):
        return "none"
    return "dequantize-merge-requantize" if quantized else "merge"


# ------------------------------------------------------------------------------- check


def check_finetune(bundle: ModelBundle, config: Finetune, ctx: RunContext) -> list[str]:
    """Model-dependent mistakes, found before any work."""
    problems: list[str] = []
    model = bundle.model
    method = method_of(config)
    # A QLoRA base already loaded in NF4 for this stage is not "quantized by an earlier stage".
    quantized = bool(ad.count_bnb(model)) and not (method.loads_4bit and bundle.info.get("qlora_base"))
    if method.adapter and getattr(config, "target_modules", None):
        problems += ad.check_targets(model, config.target_modules)
    if config.modules_to_save:
        names = [n for n, _ in model.named_modules()]
        problems += [f"modules_to_save: {m!r} matches no module of this model"
                     for m in config.modules_to_save if not any(n == m or n.endswith("." + m) for n in names)]
    if method.check is not None:
        problems += method.check(bundle, config, ctx, quantized)
    if bundle.masks and method.pruned not in ("masked", "keeps", "untouched", "full"):
        problems.append(f"method: {method.pruned}")
    if quantized and method.no_4bit:
        problems.append(f"method: the base is quantized (bitsandbytes) and {method.no_4bit}")
    if quantized and method.no_merge_4bit and config.merge not in (None, "none"):
        problems.append(f"merge: {method.no_merge_4bit}; use merge: none (keeps the adapter)")
    policy = default_policy(config, quantized)
    if config.merge == "dequantize-merge-requantize" and not quantized and not method.loads_4bit:
        problems.append("merge: the base is not quantized, so there is nothing to requantize; use merge: merge")
    if policy == "none" and method.adapter and bundle.format != "hf":
        problems.append(f"merge: none keeps the adapter next to the base, which needs a plain Hugging Face "
                        f"base (this one is {bundle.format!r}); use merge: merge or dequantize-merge-requantize"
                        + ("" if method.merge else f" with a method that merges ({config.method} cannot)"))
    problems += sharding_problems(config, ctx.device, four_bit=quantized or method.loads_4bit)
    if config.optimizer.startswith("paged") and ctx.device != "cuda":
        problems.append(f"optimizer: {config.optimizer} pages optimizer state through CUDA memory; on "
                        f"{ctx.device} use adamw or adamw_8bit")
    if config.optimizer != "adamw":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append(f"optimizer: {config.optimizer} needs bitsandbytes; pip install bitsandbytes "
                            f"or use adamw")
    return problems


# ------------------------------------------------------------------------------- run


def _wrap(model: Any, config: Finetune, method: AdapterMethod, task: str) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, method.peft_config(config, model, task))  # type: ignore[misc]


def _trainable_outside_head(model: Any) -> int:
    # peft trains the classifier head in full as a modules-to-save copy; count what the method adds.
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." not in n)


def _probe_logits(model: Any, eval_set: Any, tokenizer: Any, device: str) -> torch.Tensor:
    from compress.data import pad_collate

    rows = [eval_set[i] for i in range(min(8, len(eval_set)))]
    batch = {k: v.to(device) for k, v in pad_collate(tokenizer)(rows).items() if k != "labels"}
    model.eval()  # adapter dropout off: the probe compares deterministic outputs
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


def run_finetune(bundle: ModelBundle, config: Finetune, ctx: RunContext) -> StageResult:
    data = ctx.require_data("finetune")
    tokenizer = bundle.tokenizer
    train_set = data.tokenized("train", tokenizer)
    eval_set = data.tokenized("eval", tokenizer)
    model = bundle.model
    masks = bundle.masks
    total_params = count_parameters(model)[0]  # logical sizes: a 4-bit base counts its real shapes
    sparsity_before = ad.sparsity(model, masks)
    work = ctx.work_dir
    method = method_of(config)
    # A QLoRA base loaded straight into NF4 from its checkpoint (compress.loading) is this stage's
    # own 4-bit copy, not a quantized model from an earlier stage.
    preloaded = bundle.info.get("qlora_base") if method.loads_4bit else None
    policy = default_policy(config, bool(ad.count_bnb(model)) and not preloaded)

    targets: list[str] = []
    if not method.adapter:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if method.loads_4bit and not preloaded:
            # One copy per process: ranks of a distributed run must not write the same files.
            model = ad.load_4bit(model, bundle.task, work / f"qlora-base-rank{ctx.rank}",
                                 compute_dtype=config.compute_dtype,
                                 double_quant=config.double_quant, skip=ad.keep_float(model)
                                 + list(config.modules_to_save or []))
        quantized_layers = ad.count_bnb(model)
        if quantized_layers:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        # The adapters' initial weights depend on the seed alone, not on how much randomness loading
        # the base used (a QLoRA base reloaded here in 4-bit, or loaded in 4-bit by the runner).
        torch.manual_seed(ctx.seed)
        model = _wrap(model, config, method, bundle.task)
        targets = sorted(getattr(model, "targeted_module_names", []))
    masked_layers = ad.enable_masked(model, masks) if masks and method.pruned == "masked" else 0
    quantized_before = ad.count_bnb(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_adapter = _trainable_outside_head(model)

    from compress.data import pad_collate

    evaluate = held_out_evaluator(eval_set, tokenizer, bundle.task, device=ctx.device, num_labels=data.num_labels)
    result = train_in_stage(model, train_set, pad_collate(tokenizer), config, ctx, task=bundle.task,
                            evaluate=evaluate, masks=masks if not method.adapter else None)

    facts: dict[str, Any] = {}
    if config.save_adapter and method.adapter:
        folder = ctx.artifact_dir("adapters")
        model.save_pretrained(folder)
        facts["adapter_dir"] = str(folder)
    # A QLoRA base kept in 4-bit saves as bitsandbytes does for this architecture (`hf-bnb` where
    # transformers' loader needs help, e.g. Falcon's FalconLinear): decided on the float model.
    out_format = ((preloaded or {}).get("float_format") or bnb_quant.output_format(bundle.model)
                  if method.loads_4bit else bundle.format)
    if method.adapter and policy != "none":
        before = _probe_logits(model, eval_set, tokenizer, ctx.device)
        model = method.merge(model, masks, policy == "dequantize-merge-requantize")  # type: ignore[misc]
        after = _probe_logits(model, eval_set, tokenizer, ctx.device)
        facts.update(check_merge(before, after, policy, bool(quantized_before), config.label()))
        if policy == "dequantize-merge-requantize":
            after = ad.count_bnb(model)
            if after != quantized_before:
                raise StageError(f"merge: after dequantize-merge-requantize the model holds {after} quantized "
                                 f"layers instead of {quantized_before}; the merge lost the quantization")
            facts["quantized_layers_after_merge"] = sum(after.values())
        elif quantized_before:
            out_format = "hf"  # dequantized to float: a plain Hugging Face folder again
    elif policy == "none":
        out_format = "peft-adapter"
    if not method.adapter:
        apply_masks(model, masks)
    for p in model.parameters():
        p.requires_grad_(False)
    sparsity_after = ad.sparsity(model, masks)
    if sparsity_before is not None and sparsity_after is not None and sparsity_after < sparsity_before:
        raise StageError(f"{config.label()}: the pruned weights are no longer zero after training "
                         f"({sparsity_before:.2%} of pruned positions were zero, now {sparsity_after:.2%}); "
                         f"the sparsity was lost. Use method: lora (masked) or full, and report this as a bug "
                         f"({config.method} claims to keep the zeros: {method.pruned})")

    out = bundle.replace(model=model, format=out_format)
    out.info.pop("qlora_base", None)
    facts = {
        "method": config.method,
        "merge": policy if method.adapter else None,
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / total_params, 4),
        "trainable_outside_head": trainable_adapter,
        "trainable_outside_head_percent": round(100 * trainable_adapter / total_params, 4),
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}),
        "adapted_layers": len(targets),
        "masked_lora_layers": masked_layers,
        "quantized_layers": sum(quantized_before.values()),
        "pruned_zero_share_before": sparsity_before,
        "pruned_zero_share_after": sparsity_after,
        **facts,
        **result.summary(),
    }
    if result.eval_curve:
        facts.update({f"last_eval_{k}": v for k, v in result.eval_curve[-1][1].items()})
    out.record("finetune", config.model_dump(mode="json"),
               **{k: v for k, v in facts.items() if k not in ("loss_curve", "eval_curve")})
    return StageResult(out, facts, [Path(facts["adapter_dir"])] if "adapter_dir" in facts else [])


# How far a merged model's logits may move from the adapter model's on held-out inputs, as the
# root-mean-square change relative to the logits' own RMS. A float merge adds the update the adapter
# added, and a merge into a 4-bit base's float copy reads back the weights the adapter model ran on:
# both measured 0 (to 6 decimals) on the tiny BERT and Llama. Re-quantizing the merged weight to NF4
# rounds every weight afresh: measured 0.056 (Llama) and 0.105 (BERT, whose logits are near zero).
# A merge that misread the 4-bit layout (the bug this guards) measured 0.77-1.45.
MERGE_TOLERANCE = {"float": 1e-4, "from-4bit": 1e-3, "requantize": 0.3}


def check_merge(before: torch.Tensor, after: torch.Tensor, policy: MergePolicy, quantized_base: bool,
                label: str) -> dict[str, Any]:
    """Facts about the merge; StageError when the merged model no longer computes what the adapter
    model computed (within MERGE_TOLERANCE for this kind of merge)."""
    kind = "requantize" if policy == "dequantize-merge-requantize" else "from-4bit" if quantized_base else "float"
    rms = float(before.pow(2).mean().sqrt()) or 1.0
    change = float((after - before).pow(2).mean().sqrt()) / rms
    agreement = float((after.argmax(-1) == before.argmax(-1)).float().mean())
    facts = {"merge_relative_logit_change": round(change, 6), "merge_tolerance": MERGE_TOLERANCE[kind],
             "merge_top1_agreement": round(agreement, 4),
             "merge_max_abs_logit_change": round(float((after - before).abs().max()), 6)}
    if not change <= MERGE_TOLERANCE[kind]:
        why = ("re-rounding the merged weights to 4-bit lost too much of the adapter's update; use merge: merge "
               "(a float model that is exactly the trained one) or merge: none (keep the adapter)"
               if kind == "requantize" else
               "the merged weights are wrong; keep the adapter with merge: none and report this as a bug")
        raise StageError(f"{label}: merge ({policy}) changed the model: its logits on held-out inputs moved by "
                         f"{change:.3g} of their RMS (allowed {MERGE_TOLERANCE[kind]:g} for a {kind} merge; top-1 "
                         f"agreement {agreement:.1%}); {why}")
    return facts


# ------------------------------------------------------------------------------- adapter format


def _peft_save(bundle: ModelBundle, folder: Path) -> None:
    """Base weights (peft's wrappers stripped) as a normal HF folder, the adapter in `adapter/`."""
    from huggingface_hub import save_torch_state_dict

    model = bundle.model
    base = model.get_base_model()
    clean = ad.base_state_dict(model)  # the base's weights without any method's adapter (peft's own layout)
    base.save_pretrained(folder)  # config, generation config, quantization config
    # transformers 5 ignores `state_dict=` for quantized bases and would write peft's wrapped names
    # (`...query.base_layer.weight`), which reload as missing weights; write the unwrapped ones.
    for old in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
        old.unlink()
    save_torch_state_dict({k: v.data if isinstance(v, torch.nn.Parameter) else v for k, v in clean.items()},
                          folder)
    model.save_pretrained(folder / "adapter")


def _peft_load(folder: Path, meta: dict[str, Any]) -> Any:
    from peft import PeftModel
    from safetensors.torch import load_file

    from compress.bundle import MASKS_FILE

    with bnb_quant.linear_subclasses_as_linear():  # a 4-bit Falcon base (see quant/bnb.py)
        base = from_pretrained_checked(meta["task"], str(folder))
    model = PeftModel.from_pretrained(base, str(folder / "adapter"))
    if (folder / MASKS_FILE).exists():
        ad.enable_masked(model, {k: v.bool() for k, v in load_file(str(folder / MASKS_FILE)).items()})
    model.eval()
    return model


register_format(ModelFormat("peft-adapter", _peft_save, _peft_load))
def nf4_load_plan(config: Finetune) -> dict[str, Any] | None:
    """QLoRA as the first stage: the base loads straight into NF4 (never in full precision)."""
    if not method_of(config).loads_4bit:
        return None
    return {"compute_dtype": config.compute_dtype, "double_quant": config.double_quant,
            "keep_float": list(config.modules_to_save or [])}


register_stage(Finetune, run_finetune, check=check_finetune, distributed=True, load_plan=nf4_load_plan)

__all__ = ["Finetune", "check_finetune", "run_finetune"]
