"""Fine-tuning stage: LoRA / DoRA / QLoRA adapters (peft) or full fine-tuning, on the shared loop.

Merge policies: `none` keeps the adapter (saved in PEFT format next to the base), `merge` folds it
into float weights, `dequantize-merge-requantize` folds it into a bitsandbytes base and checks the
result is still quantized. A pruned base stays pruned: LoRA is masked and the merge is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.bundle import ModelBundle, ModelFormat, from_pretrained_checked, register_format
from compress.context import RunContext
from compress.errors import StageError
from compress.evaluate.accuracy import evaluate_accuracy
from compress.evaluate.size import count_parameters
from compress.pruning.targets import is_conv1d
from compress.quant import bnb as bnb_quant
from compress.quant.bnb_weights import unpack_cpu_layout
from compress.registry import StageConfig, StageResult, register_stage
from compress.training import TrainingFields, train
from compress.training import adapters as ad
from compress.training.loop import apply_masks, sharding_problems

MergePolicy = Literal["none", "merge", "dequantize-merge-requantize"]


class Finetune(StageConfig, TrainingFields):
    """Fine-tune on the recipe's training data: LoRA/DoRA/QLoRA adapters, or all weights."""

    type: Literal["finetune"] = "finetune"
    method: Literal["lora", "dora", "qlora", "full"] = Field(
        "lora", description="lora, dora (magnitude-decomposed LoRA), qlora (LoRA on an NF4 4-bit base), or full.")
    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha/r).")
    # 0 by default (as torchtune does): peft draws a separate dropout mask for every adapted layer,
    # and on CPU those random draws made a LoRA step 60% slower than with no dropout (measured on
    # MiniLM, batch 32: 1170 vs 737 ms) -- slower than full fine-tuning.
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (costs ~60% more "
                                                        "time per step on CPU).")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: every linear layer except the output/classifier head."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full next to the adapters; a classifier head is always included."
    )
    double_quant: bool = Field(True, description="qlora: also quantize the 4-bit scales (saves ~0.4 bit/weight).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="qlora: dtype the 4-bit layers compute in (float32 on CPU).")
    merge: MergePolicy | None = Field(
        None, description="none (keep the adapter), merge (into float weights), or dequantize-merge-requantize "
                          "(into a quantized base, kept quantized; checked, and refused when re-rounding to "
                          "4-bit loses too much of the update). Default: the latter when an earlier stage "
                          "quantized the base, else merge (QLoRA included: its 4-bit base is a training-time "
                          "saving, and the float merge is exactly the model it trained).")
    save_adapter: bool = Field(False, description="Also write the trained adapter (PEFT format) to "
                                                  "<output_dir>/adapters/<stage folder>/.")

    @model_validator(mode="after")
    def _method_combinations(self) -> Finetune:
        if self.method == "full" and self.merge not in (None, "merge"):
            raise ValueError(f"merge: full fine-tuning has no adapter to merge ({self.merge!r}); remove merge")
        if self.method == "full" and self.save_adapter:
            raise ValueError("save_adapter: full fine-tuning has no adapter; remove save_adapter")
        return self


# ------------------------------------------------------------------------------- check


def check_finetune(bundle: ModelBundle, config: Finetune, ctx: RunContext) -> list[str]:
    """Model-dependent mistakes, found before any work."""
    problems: list[str] = []
    model = bundle.model
    # A QLoRA base already loaded in NF4 for this stage is not "quantized by an earlier stage".
    quantized = bool(ad.count_bnb(model)) and not (config.method == "qlora" and bundle.info.get("qlora_base"))
    if config.method != "full" and config.target_modules:
        problems += ad.check_targets(model, config.target_modules)
    if config.modules_to_save:
        names = [n for n, _ in model.named_modules()]
        problems += [f"modules_to_save: {m!r} matches no module of this model"
                     for m in config.modules_to_save if not any(n == m or n.endswith("." + m) for n in names)]
    if config.method == "qlora":
        if quantized:
            problems.append("method: the model is already quantized by an earlier stage; use method: lora "
                            "(it trains adapters on the quantized base)")
        elif conv := sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_conv1d(m)}):
            # transformers' 4-bit loader keeps Conv1D's (in, out) checkpoint layout against the
            # (out, in) Linear4bit it builds, and refuses the size mismatch (transformers 5.24).
            problems.append(f"method: qlora reloads the base in 4-bit, which transformers cannot do for "
                            f"Conv1D layers ({', '.join(conv)}: weights stored transposed); use method: lora")
        elif (why := ad.bnb_4bit_problem(ctx.device)) is not None:
            problems.append(f"method: qlora needs bitsandbytes 4-bit on {ctx.device}, which fails here ({why}); "
                            f"install a bitsandbytes build for this device (>=0.46 for CPU) or use method: lora")
    if config.method == "full" and quantized:
        problems.append("method: full fine-tuning cannot update quantized weights; use method: lora")
    if config.method == "dora" and bundle.masks:
        problems.append("method: DoRA rescales whole weight columns, so it cannot keep the pruned weights at zero; "
                        "use method: lora (masked LoRA keeps the sparsity)")
    if config.merge == "dequantize-merge-requantize" and not quantized and config.method != "qlora":
        problems.append("merge: the base is not quantized, so there is nothing to requantize; use merge: merge")
    if config.merge == "none" and bundle.format != "hf":
        problems.append(f"merge: none keeps the adapter next to the base, which needs a plain Hugging Face "
                        f"base (this one is {bundle.format!r}); use merge: merge or dequantize-merge-requantize")
    problems += sharding_problems(config, ctx.device)
    if config.optimizer.startswith("paged") and ctx.device != "cuda":
        problems.append(f"optimizer: {config.optimizer} pages optimizer state through CUDA memory; on "
                        f"{ctx.device} use adamw or adamw_8bit")
    if config.optimizer != "adamw":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append(f"optimizer: {config.optimizer} needs bitsandbytes; pip install bitsandbytes "
                            f"or use adamw")
    for name in ("fsdp", "deepspeed"):
        if getattr(config, name) is not None and ctx.device != "cuda":
            problems.append(f"{name}: needs CUDA GPUs (device is {ctx.device}); remove {name} to train with DDP")
    return problems


# ------------------------------------------------------------------------------- run


def _targets(model: Any, config: Finetune) -> list[str]:
    # Full module names, not short ones: a short name like `dense` can also live inside a head.
    return config.target_modules or sorted(ad.linear_layers(model))


def _wrap(model: Any, config: Finetune, task: str, targets: list[str]) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        modules_to_save=config.modules_to_save, use_dora=config.method == "dora",
        task_type=TaskType.SEQ_CLS if task == "sequence-classification" else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, lora)


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
    # A QLoRA base loaded straight into NF4 from its checkpoint (compress.loading) is this stage's
    # own 4-bit copy, not a quantized model from an earlier stage.
    preloaded = bundle.info.get("qlora_base") if config.method == "qlora" else None
    policy: MergePolicy = config.merge or (
        "dequantize-merge-requantize" if ad.count_bnb(model) and not preloaded else "merge")
    if config.method == "full":
        policy = "merge"

    targets: list[str] = []
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if config.method == "qlora" and not preloaded:
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
        targets = _targets(model, config)
        # The adapters' initial weights depend on the seed alone, not on how much randomness loading
        # the base used (a QLoRA base reloaded here in 4-bit, or loaded in 4-bit by the runner).
        torch.manual_seed(ctx.seed)
        model = _wrap(model, config, bundle.task, targets)
        targets = sorted(getattr(model, "targeted_module_names", targets))
    masked_layers = ad.enable_masked_lora(model, masks) if masks and config.method != "full" else 0
    quantized_before = ad.count_bnb(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from compress.data import pad_collate

    def evaluate(m: Any) -> dict[str, float]:
        metrics, _ = evaluate_accuracy(m, eval_set, tokenizer, bundle.task, device=ctx.device,
                                       num_labels=data.num_labels)
        return {k: v for k, v in metrics.model_dump().items() if isinstance(v, float)}

    result = train(
        model, train_set, pad_collate(tokenizer), config,
        device=ctx.device, seed=ctx.seed, evaluate=evaluate,
        eval_metric="accuracy" if bundle.task == "sequence-classification" else "eval_loss",
        masks=masks if config.method == "full" else None,
        show_progress=ctx.show_progress, label=config.label(),
        checkpoint_dir=work / "checkpoint", resume=ctx.resume, stop=ctx.stop,
    )

    facts: dict[str, Any] = {}
    if config.save_adapter and config.method != "full":
        folder = ctx.artifact_dir("adapters")
        model.save_pretrained(folder)
        facts["adapter_dir"] = str(folder)
    # A QLoRA base kept in 4-bit saves as bitsandbytes does for this architecture (`hf-bnb` where
    # transformers' loader needs help, e.g. Falcon's FalconLinear): decided on the float model.
    out_format = ((preloaded or {}).get("float_format") or bnb_quant.output_format(bundle.model)
                  if config.method == "qlora" else bundle.format)
    if config.method != "full" and policy != "none":
        before = _probe_logits(model, eval_set, tokenizer, ctx.device)
        model = _merge(model, config, policy, masks)
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
    if config.method == "full":
        apply_masks(model, masks)
    for p in model.parameters():
        p.requires_grad_(False)
    sparsity_after = ad.sparsity(model, masks)
    if sparsity_before is not None and sparsity_after is not None and sparsity_after < sparsity_before:
        raise StageError(f"{config.label()}: the pruned weights are no longer zero after training "
                         f"({sparsity_before:.2%} of pruned positions were zero, now {sparsity_after:.2%}); "
                         f"the sparsity was lost. Use method: lora (masked) or full, and report this as a bug")

    out = bundle.replace(model=model, format=out_format)
    out.info.pop("qlora_base", None)
    facts = {
        "method": config.method,
        "merge": policy if config.method != "full" else None,
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / total_params, 4),
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


def _merge(model: Any, config: Finetune, policy: MergePolicy, masks: dict[str, torch.Tensor]) -> Any:
    requantize = policy == "dequantize-merge-requantize"
    if config.method == "dora":
        # DoRA's merge rescales by the column norms; peft's own merge does it (and requantizes bnb layers).
        # peft reads 4-bit weights in bitsandbytes' canonical layout only (see quant/bnb_weights).
        unpack_cpu_layout(model)
        merged = model.merge_and_unload()
        return merged if requantize else ad.dequantize_all(merged)
    return ad.merge_lora(model, masks, requantize=requantize)


# ------------------------------------------------------------------------------- adapter format


def _peft_save(bundle: ModelBundle, folder: Path) -> None:
    """Base weights (peft's wrappers stripped) as a normal HF folder, the adapter in `adapter/`."""
    from huggingface_hub import save_torch_state_dict

    model = bundle.model
    base = model.get_base_model()
    clean = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        clean[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
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
        ad.enable_masked_lora(model, {k: v.bool() for k, v in load_file(str(folder / MASKS_FILE)).items()})
    model.eval()
    return model


register_format(ModelFormat("peft-adapter", _peft_save, _peft_load))
def nf4_load_plan(config: Finetune) -> dict[str, Any] | None:
    """QLoRA as the first stage: the base loads straight into NF4 (never in full precision)."""
    if config.method != "qlora":
        return None
    return {"compute_dtype": config.compute_dtype, "double_quant": config.double_quant,
            "keep_float": list(config.modules_to_save or [])}


register_stage(Finetune, run_finetune, check=check_finetune, distributed=True, load_plan=nf4_load_plan)

__all__ = ["Finetune", "check_finetune", "run_finetune"]
