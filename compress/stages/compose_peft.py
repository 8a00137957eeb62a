"""The peft side of adapter composition: one LoRA adapter per task on a shared base, combined with
peft's own `add_weighted_adapter` (linear, cat, SVD, TIES, DARE, magnitude pruning), saved as plain
PEFT folders.

Heads: a classifier's head differs per task (its own label set), so each task trains on a copy of the
base whose head is built for its labels, and peft keeps that head as a `modules_to_save` copy of the
adapter. Only the body's LoRA weights are combined; the composed adapter of a task is the combined
body plus that task's own head. Every folder loads with plain peft onto the base built with the task's
number of labels (`from_pretrained(base, num_labels=N)`), as any sequence-classification adapter does.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from compress.errors import StageError
from compress.layers import CLASSIFIER_HEADS

COMPOSED = "composed"  # the adapter name of the combined body inside each task's PeftModel
SINGLE = "default"  # peft's name for a model's first adapter: the task's own


def task_base(model: Any, label_names: list[str] | None, *, reuse: bool, seed: int) -> Any:
    """A copy of `model` for one task: the same body, and for a classifier a head built for the task's
    labels (`reuse`: keep the model's own head, e.g. the recipe's task, whose head the base already has).
    The head is initialised from `seed`, like a freshly loaded classifier's."""
    if reuse or label_names is None:
        return copy.deepcopy(model)
    config = copy.deepcopy(model.config)
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    torch.manual_seed(seed)
    fresh = type(model)(config).to(dtype=model.dtype, device=model.device)
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    result = fresh.load_state_dict({k: v for k, v in model.state_dict().items() if shapes.get(k) == v.shape},
                                   strict=False)
    body_missing = [k for k in result.missing_keys if k.split(".", 1)[0] not in CLASSIFIER_HEADS]
    if body_missing:  # only the head may be new: anything else would train from random weights
        raise StageError(f"compose: building a head for {len(label_names)} labels left body weights unset "
                         f"({', '.join(body_missing[:3])}); this architecture's head is not one of "
                         f"{', '.join(CLASSIFIER_HEADS)}")
    return fresh


def body_state(model: Any, adapter: str = SINGLE) -> dict[str, torch.Tensor]:
    """The adapter's LoRA weights (peft's saved names), without the task's head."""
    from peft import get_peft_model_state_dict

    return {k: v for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items() if "lora_" in k}


def head_state(model: Any, adapter: str = SINGLE) -> dict[str, torch.Tensor]:
    """The task's head (peft's modules_to_save copy), under peft's saved names."""
    from peft import get_peft_model_state_dict

    return {k: v for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items() if "lora_" not in k}


def combine(base: Any, bodies: dict[str, dict[str, torch.Tensor]], peft_config: Any, weights: list[float],
            combination: str, density: float | None, majority_sign: str | None) -> tuple[Any, dict[str, Any]]:
    """The task bodies combined by peft's `add_weighted_adapter`: the new adapter's config and weights.

    The bodies are loaded as adapters of one PeftModel over a copy of `base` (no heads: peft refuses to
    combine adapters that each keep a copy of the same module)."""
    from peft import get_peft_model, set_peft_model_state_dict

    body_config = replace(peft_config, task_type=None, modules_to_save=None)
    names = list(bodies)
    model = get_peft_model(copy.deepcopy(base), body_config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, body_config)
    for name, state in bodies.items():
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        if result.unexpected_keys:
            raise StageError(f"compose: task {name!r}'s adapter weights do not fit the base "
                             f"({', '.join(result.unexpected_keys[:3])})")
    kwargs: dict[str, Any] = {"density": density} if density is not None else {}
    if majority_sign is not None:
        kwargs["majority_sign_method"] = majority_sign
    model.add_weighted_adapter(names, weights, COMPOSED, combination_type=combination, **kwargs)
    composed_config = model.peft_config[COMPOSED]
    state = body_state(model, COMPOSED)
    del model
    return composed_config, state


def add_composed(model: Any, composed_config: Any, body: dict[str, torch.Tensor]) -> None:
    """Give a task's PeftModel the combined body as adapter `composed`, with the task's own trained head,
    and make it the active adapter."""
    from peft import set_peft_model_state_dict

    head = head_state(model, SINGLE)
    model.add_adapter(COMPOSED, replace(composed_config, task_type=model.peft_config[SINGLE].task_type,
                                        modules_to_save=model.peft_config[SINGLE].modules_to_save))
    result = set_peft_model_state_dict(model, {**body, **head}, adapter_name=COMPOSED)
    missing = [k for k in result.missing_keys if f".{COMPOSED}." in k]
    if result.unexpected_keys or missing:
        raise StageError(f"compose: the combined adapter does not fit the task model (unexpected "
                         f"{result.unexpected_keys[:3]}, missing {missing[:3]})")
    model.set_adapter(COMPOSED)


def save_adapter(model: Any, adapter: str, folder: Path) -> Path:
    """Write one adapter as a plain PEFT folder (`adapter_config.json`, `adapter_model.safetensors`) at
    `folder`, through a temporary name so a crash never leaves a half-written folder."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=[adapter])
    written = tmp / adapter if adapter != SINGLE else tmp  # peft writes non-default adapters in a subfolder
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    written.rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def merge_active(model: Any) -> Any:
    """The base with the active adapter folded in (its head included): a plain transformers model."""
    return model.merge_and_unload()


def probe_logits(model: Any, eval_set: Any, tokenizer: Any, device: str) -> torch.Tensor:
    """The model's logits on up to 8 held-out examples (eval mode: deterministic), to check a merge."""
    from compress.data import pad_collate

    rows = [eval_set[i] for i in range(min(8, len(eval_set)))]
    batch = {k: v.to(device) for k, v in pad_collate(tokenizer)(rows).items() if k != "labels"}
    model.eval()
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()
