"""Fine-tuning stage: LoRA / DoRA adapters (peft) or full fine-tuning, on the shared training loop."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.errors import StageError
from compress.evaluate.accuracy import evaluate_accuracy
from compress.registry import StageConfig, register_stage
from compress.training import TrainingFields, train
from compress.training.loop import apply_masks


class Finetune(StageConfig, TrainingFields):
    """Fine-tune on the recipe's training data: LoRA/DoRA adapters (merged back) or all weights."""

    type: Literal["finetune"] = "finetune"
    method: Literal["lora", "dora", "full"] = Field("lora", description="Adapter method, or full fine-tuning.")
    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha/r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: every linear layer except the output head."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full next to the adapters; default: the classifier head."
    )
    merge: Literal["merge"] = Field("merge", description="Merge adapters into the weights after training.")

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> Finetune:
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every (how often to evaluate)")
        return self


def _linear_names(model: Any) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear)})


def _wrap_with_adapters(model: Any, config: Finetune, task: str) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    if config.target_modules:
        available = _linear_names(model)
        missing = [t for t in config.target_modules if t not in available
                   and not any(n.endswith(t) for n, _ in model.named_modules())]
        if missing:
            raise StageError(f"finetune.target_modules: {missing} not found in the model; "
                             f"linear layers here: {', '.join(available)}")
    task_type = TaskType.SEQ_CLS if task == "sequence-classification" else TaskType.CAUSAL_LM
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules or "all-linear",
        modules_to_save=config.modules_to_save,
        use_dora=config.method == "dora",
        task_type=task_type,
    )
    return get_peft_model(model, lora)


def run_finetune(bundle: ModelBundle, config: Finetune, ctx: RunContext) -> ModelBundle:
    data = ctx.require_data("finetune")
    tokenizer = bundle.tokenizer
    train_set = data.tokenized("train", tokenizer)
    eval_set = data.tokenized("eval", tokenizer)
    model = bundle.model
    total_params = sum(p.numel() for p in model.parameters())

    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        targets: list[str] = []
    else:
        model = _wrap_with_adapters(model, config, bundle.task)
        targets = sorted(getattr(model, "targeted_module_names", []))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from compress.data import pad_collate

    def evaluate(m: Any) -> dict[str, float]:
        metrics, _ = evaluate_accuracy(m, eval_set, tokenizer, bundle.task, device=ctx.device,
                                       num_labels=data.num_labels)
        return {k: v for k, v in metrics.model_dump().items() if isinstance(v, float)}

    metric = "accuracy" if bundle.task == "sequence-classification" else "loss"
    result = train(
        model, train_set, pad_collate(tokenizer), config,
        device=ctx.device, seed=ctx.seed, evaluate=evaluate,
        eval_metric="eval_loss" if metric == "loss" else metric,
        masks=bundle.masks if config.method == "full" else None,
        show_progress=ctx.show_progress, label=config.label(),
    )

    if config.method != "full":
        model = model.merge_and_unload()
        # Adapters were trained on a masked base; the merged delta is dense, so re-apply the masks.
        apply_masks(model, bundle.masks)
    for p in model.parameters():
        p.requires_grad_(False)

    out = bundle.replace(model=model)
    facts = {
        "method": config.method,
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / total_params, 4),
        "target_modules": targets,
        **result.summary(),
    }
    out.record("finetune", config.model_dump(mode="json"), **{k: v for k, v in facts.items()
                                                             if k not in ("loss_curve", "eval_curve")})
    out.info["last_stage"] = facts
    return out


register_stage(Finetune, run_finetune)
