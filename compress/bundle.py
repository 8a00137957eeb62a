"""ModelBundle: what flows between stages — model, tokenizer, task, pruning masks and lineage.

`save()` writes a Hugging Face folder (config + safetensors + tokenizer) plus `compress_bundle.json`
(task, lineage, format); `load()` is its exact inverse. Stages whose models are not plain
`from_pretrained` folders (e.g. factorised or CPU-quantized layers) register a *format* with a
save and a load function, so the bundle stays the one place that knows how models reach disk.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.errors import ModelError
from compress.io import atomic_dir, write_json_atomic
from compress.portable import mark_compress_only
from compress.quant.bnb_weights import keep_canonical_layout

BUNDLE_FILE = "compress_bundle.json"
MASKS_FILE = "masks.safetensors"
BUNDLE_SCHEMA = 1


@dataclass
class ModelFormat:
    """How a model kind reaches disk. `save(bundle, folder)`; `load(folder, meta, bundle_kwargs) -> model`."""

    name: str
    save: Callable[[ModelBundle, Path], None]
    load: Callable[[Path, dict[str, Any]], Any]
    # False for compress's own layer formats: their config.json is then marked so plain transformers
    # refuses the folder instead of loading random weights (see compress/portable.py); their loader
    # reads the config with `portable.read_config`.
    plain_loadable: bool = True


_FORMATS: dict[str, ModelFormat] = {}


def register_format(fmt: ModelFormat) -> None:
    _FORMATS[fmt.name] = fmt


def model_format(name: str) -> ModelFormat | None:
    """The registered format `name`. The built-in formats register with their stages, which load
    lazily (compress/__init__.py), so they are imported here the first time a name is missing."""
    if name not in _FORMATS:
        import compress.stages  # noqa: F401  (registers quantized, lowrank, hf-bnb, peft-adapter, ...)
    return _FORMATS.get(name)


@dataclass
class ModelBundle:
    model: Any
    tokenizer: Any
    task: str
    lineage: list[dict[str, Any]] = field(default_factory=list)
    # Pruning masks (parameter name -> bool tensor, True = keep). Later training stages re-apply them.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    format: str = "hf"
    source: str | None = None
    # Free-form facts a stage wants in the report (e.g. trained parameter counts, loss curve).
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keep_canonical_layout(self.model)

    def record(self, stage_type: str, settings: dict[str, Any], **facts: Any) -> None:
        """Append a lineage entry: which stage ran, with which settings, and what it found."""
        self.lineage.append({"stage": stage_type, "settings": settings, **facts})

    def replace(self, **changes: Any) -> ModelBundle:
        """A shallow copy with some fields changed (lineage and info are copied, not shared)."""
        new = copy.copy(self)
        new.lineage = copy.deepcopy(self.lineage)
        new.info = copy.deepcopy(self.info)
        new.masks = dict(self.masks)
        for key, value in changes.items():
            setattr(new, key, value)
        if "model" in changes:
            keep_canonical_layout(new.model)
        return new

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, verify: bool = True) -> Path:
        """Write the bundle to `path` atomically (temporary sibling folder, then rename). With `verify`,
        the written folder is loaded back before the rename and must give the in-memory model's
        logits (see `verify_reload`), so a folder that looks complete always reloads as saved."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            fmt = model_format(self.format)
            if fmt is None:
                raise ModelError(f"no saver for model format {self.format!r}")
            fmt.save(self, tmp)
            if not fmt.plain_loadable:
                mark_compress_only(tmp, fmt.name)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if self.masks:
                save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in self.masks.items()},
                          str(tmp / MASKS_FILE))
            write_json_atomic(tmp / BUNDLE_FILE, {
                "schema": BUNDLE_SCHEMA,
                "task": self.task,
                "format": self.format,
                "source": self.source,
                "lineage": self.lineage,
                "info": self.info,
            })
            if verify:
                verify_reload(self, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> ModelBundle:
        """Load a folder written by `save()` (or any Hugging Face model folder)."""
        path = Path(path)
        meta_path = path / BUNDLE_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        fmt_name = meta.get("format", "hf")
        fmt = model_format(fmt_name)
        if fmt is None:
            raise ModelError(f"{path}: model format {fmt_name!r} is unknown to this version of compress")
        task = meta.get("task") or detect_task(path)
        meta = {**meta, "task": task}
        model = fmt.load(path, meta)
        model.to(device)
        masks = {}
        if (path / MASKS_FILE).exists():
            masks = {k: v.bool() for k, v in load_file(str(path / MASKS_FILE)).items()}
        return cls(
            model=model,
            tokenizer=load_tokenizer(path),
            task=task,
            lineage=meta.get("lineage", []),
            masks=masks,
            format=fmt_name,
            source=meta.get("source", str(path)),
            info=meta.get("info", {}),
        )


# ---------------------------------------------------------------------- HF format


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification}[task]


def detect_task(path_or_config: Any) -> str:
    """Task from a config's `architectures`; raises ModelError when the config does not say."""
    from transformers import AutoConfig

    config = path_or_config
    if not hasattr(config, "architectures"):
        config = AutoConfig.from_pretrained(path_or_config)
    archs = config.architectures or []
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    raise ModelError(
        f"model.task: cannot tell the task from architectures {archs}; "
        f"set model.task to 'sequence-classification' or 'causal-lm'"
    )


def load_tokenizer(path: str | Path, **kwargs: Any):
    from transformers import AutoTokenizer

    from compress.portable import is_compress_only, read_config

    if "config" not in kwargs and Path(path).is_dir() and is_compress_only(Path(path)):
        # Its config.json names compress as the model type; without the real config, AutoTokenizer
        # falls back to a bare config and transformers warns that the model type does not match.
        kwargs["config"] = read_config(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Causal LMs often ship without a pad token; padding with EOS is the usual, harmless choice
        # because padded positions are masked out of attention and loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hf_save(bundle: ModelBundle, folder: Path) -> None:
    bundle.model.save_pretrained(folder)


def from_pretrained_checked(task: str, location: str, *, base: bool = False, **kwargs: Any) -> Any:
    """`from_pretrained`, refusing weights that do not match the config: transformers would initialise
    missing weights at random and drop unexpected ones, silently. A stage output (`base=False`) must
    match exactly. A base model (`base=True`) may lack only its task head (a new classifier, whose
    weights are initialised by design) and may carry another task's head; its backbone must match."""
    model, info = auto_class(task).from_pretrained(location, output_loading_info=True, **kwargs)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def fatal(keys: Any) -> list[str]:
        keys = sorted(k if isinstance(k, str) else str(k[0]) for k in keys or [])
        return [k for k in keys if k.startswith(prefix)] if base and prefix != "." else keys

    problems = {kind: fatal(info.get(key)) for kind, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("shape-mismatched", "mismatched_keys"))}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{len(keys)} {kind} ({', '.join(keys[:4])}{', …' if len(keys) > 4 else ''})"
                           for kind, keys in problems.items())
        raise ModelError(f"{location}: its weights do not match its config.json — {detail}. Loading it would give "
                         f"a model with randomly initialised layers; check that the folder's weights and config "
                         f"belong together (re-save or re-download it)")
    return model


def _hf_load(folder: Path, meta: dict[str, Any]):
    return from_pretrained_checked(meta["task"], str(folder))


register_format(ModelFormat("hf", _hf_save, _hf_load))


# ---------------------------------------------------------------------- reload check

# Largest |logit| difference allowed between a model and its reload, relative to the largest logit.
# A faithful save reproduces the weights bit for bit, so the only slack is kernel-level
# nondeterminism of float sums (~1e-7 relative in fp32); 1e-5 leaves room for that and nothing else.
RELOAD_TOLERANCE = 1e-5


def probe_inputs(model: Any, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """A fixed batch of token ids inside the model's (possibly trimmed) vocabulary."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, length // 2:] = 0  # one padded row, so padding paths are compared too
    return {"input_ids": ids, "attention_mask": mask}


def probe_logits(model: Any, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    inputs = inputs or probe_inputs(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
    model.train(was_training)
    return logits


def verify_reload(bundle: ModelBundle, folder: Path) -> float:
    """Load `folder` back and compare its logits with `bundle.model`'s; ModelError when they differ
    by more than RELOAD_TOLERANCE (relative). Returns the relative difference."""
    inputs = probe_inputs(bundle.model)
    expected = probe_logits(bundle.model, inputs)
    meta = {**json.loads((folder / BUNDLE_FILE).read_text()), "task": bundle.task}
    reloaded = _FORMATS[bundle.format].load(folder, meta)
    keep_canonical_layout(reloaded)
    got = probe_logits(reloaded.to(next(bundle.model.parameters()).device), inputs)
    del reloaded
    scale = float(expected.abs().max()) or 1.0
    diff = float((got - expected).abs().max()) / scale if got.shape == expected.shape else float("inf")
    if not diff <= RELOAD_TOLERANCE:
        raise ModelError(f"saving the {bundle.format!r} model to {folder.name}: the folder reloads with different "
                         f"outputs (largest logit difference {diff:.3g} of the largest logit, allowed "
                         f"{RELOAD_TOLERANCE:g}); the saved weights do not reproduce the model. This is a bug "
                         f"in that format's save/load; nothing was written")
    return diff
