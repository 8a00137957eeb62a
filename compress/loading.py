"""Load the recipe's base model: task detection, tokenizer, classifier labels, trust_remote_code off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.bundle import ModelBundle, detect_task, from_pretrained_checked, load_tokenizer
from compress.errors import ModelError
from compress.modelconfig import TORCH_DTYPES
from compress.paths import looks_like_local_path, resolve_path
from compress.specs import ModelSpec


def model_location(spec: ModelSpec) -> str:
    """Where transformers reads the model: the resolved local folder, or the Hub id."""
    if not looks_like_local_path(spec.path):
        return spec.path
    path = resolve_path(spec.path)
    return str(path.parent if spec.path.endswith(".gguf") else path)


def gguf_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """from_pretrained arguments for a GGUF checkpoint, or nothing for a safetensors one."""
    name = spec.gguf_file or (resolve_path(spec.path).name if spec.path.endswith(".gguf") else None)
    return {"gguf_file": name} if name else {}


def compress_output(spec: ModelSpec) -> Path | None:
    """The folder when `model.path` is a stage output of an earlier compress run (it may hold compress's
    own layers, which only `ModelBundle.load` builds), else None."""
    from compress.bundle import BUNDLE_FILE

    if not looks_like_local_path(spec.path) or gguf_kwargs(spec):
        return None
    folder = resolve_path(spec.path)
    return folder if (folder / BUNDLE_FILE).is_file() else None


def checkpoint_dtype(config: Any) -> str | None:
    """The dtype a checkpoint's config.json names (`dtype`, or the older `torch_dtype`), if it is one a
    recipe can load (float32, bfloat16, float16)."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        named = str(named).removeprefix("torch.")
    return named if named in TORCH_DTYPES else None


def resolve_dtype(spec: ModelSpec, config: Any, device: str, bf16_supported: bool | None = None) -> str:
    """`model.dtype` as a concrete dtype name. `auto` is the checkpoint's own dtype; a checkpoint that names
    none gets bfloat16 on a GPU that supports it (`bf16_supported`, default: ask torch) and float32 otherwise."""
    if spec.dtype != "auto":
        return spec.dtype
    saved = checkpoint_dtype(config)
    if saved is not None:
        return saved
    if device == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if bf16_supported:
            return "bfloat16"
    return "float32"


def load_config(spec: ModelSpec) -> Any:
    """The model's config (no weights): what task detection and the pre-flight checks read."""
    from transformers import AutoConfig

    if (folder := compress_output(spec)) is not None:
        from compress.portable import read_config

        return read_config(folder)
    check_weights_format(spec)
    if looks_like_local_path(spec.path) and resolve_path(spec.path).is_file() and not gguf_kwargs(spec):
        raise ModelError(f"model.path: {spec.path!r} is a file; give the model's folder (with config.json), "
                         f"or a .gguf file")
    try:
        return AutoConfig.from_pretrained(model_location(spec), revision=spec.revision,
                                          trust_remote_code=spec.trust_remote_code, **gguf_kwargs(spec))
    except Exception as exc:  # noqa: BLE001 - OSError offline, ValueError for unknown model types
        if "trust_remote_code" in str(exc) and not spec.trust_remote_code:
            raise ModelError(
                f"model.path: {spec.path!r} ships its own model code, which compress does not run by default; "
                f"set model.trust_remote_code: true only if you have read that code and trust it") from None
        damaged = _gguf_problem(spec)
        if damaged:
            raise ModelError(damaged) from None
        local = looks_like_local_path(spec.path)
        if local and (resolve_path(spec.path) / "config.json").is_file():
            hint = "its config.json cannot be read; restore it from the model's source"
        elif local:
            hint = "it must hold a config.json"
        else:
            hint = "the Hub could not be reached or has no such model; use a local folder when offline"
        raise ModelError(f"model.path: cannot load a config from {spec.path!r}: {hint} ({exc})") from None


def _gguf_problem(spec: ModelSpec) -> str | None:
    """What is wrong with a local GGUF file that transformers could not read, in the user's terms."""
    name = gguf_kwargs(spec).get("gguf_file")
    if not name or not looks_like_local_path(spec.path):
        return None
    path = resolve_path(model_location(spec)) / name
    field = "model.gguf_file" if spec.gguf_file else "model.path"
    size = path.stat().st_size if path.is_file() else 0
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if size == 0:
        problem = "it is empty"
    elif magic != b"GGUF":
        problem = f"it does not start with the GGUF signature (starts with {magic!r}), so it is not a GGUF file"
    else:
        try:
            import gguf

            gguf.GGUFReader(str(path))
            return None  # the file itself is sound: the config error is about something else
        except Exception as exc:  # noqa: BLE001 - the reader's errors are numpy reshape/mmap errors
            problem = f"its contents do not match its header ({size:,} bytes; {exc})"
    return (f"{field}: {str(path)!r} is not a readable GGUF file: {problem}; it is truncated or damaged — "
            f"download it again (or check the path)")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(spec: ModelSpec, field: str = "model.path") -> None:
    """Refuse a local folder whose weights exist only as pickle, unless the recipe opts in."""
    if spec.allow_pickle or not looks_like_local_path(spec.path) or gguf_kwargs(spec):
        return
    folder = resolve_path(spec.path)
    files = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        fix = ("Convert them to safetensors, or set model.allow_pickle: true if you trust them"
               if field == "model.path" else "Convert them to safetensors (teachers and students load only those)")
        raise ModelError(
            f"{field}: {spec.path!r} has only pickle weights ({', '.join(sorted(pickles))}); loading pickle can "
            f"run arbitrary code. {fix}"
        )


def resolve_task(spec: ModelSpec) -> str:
    """The recipe's task, or the one read from the model config (cheap: no weights are loaded)."""
    if spec.task != "auto":
        load_config(spec)  # still fail early on an unreadable model folder
        return spec.task
    return detect_task(load_config(spec))


def load_base_model(spec: ModelSpec, task: str, data: Any, device: str, seed: int,
                    nf4: dict[str, Any] | None = None, device_map: dict[str, Any] | None = None) -> ModelBundle:
    """Load weights and tokenizer. A classifier gets its labels from the data. `device_map`: the placement
    already planned for model.device_map (planned here when not given)."""
    if spec.device_map is not None and device_map is None:
        from compress.placement import plan_device_map

        device_map = plan_device_map(spec, task, device)
    return load_model(spec, task, device, seed, label_names=getattr(data, "label_names", None), nf4=nf4,
                      device_map=device_map)


def load_other_model(path: str, task: str, device: str, *, field: str, label_names: list[str] | None = None,
                     with_head: bool = True) -> ModelBundle:
    """A teacher or student named by a stage field: the same loader and safety checks as the base
    model (safetensors only, no remote code, every weight accounted for), with errors naming `field`."""
    try:
        spec = ModelSpec(path=path, task=task, num_labels=len(label_names) if label_names else None)
    except ValueError as exc:  # pydantic's error: the path does not exist
        raise ModelError(f"{field}: {str(exc).splitlines()[-1].strip()}") from None
    return load_model(spec, task, device, seed=0, label_names=label_names, field=field, base=not with_head)


def load_model(spec: ModelSpec, task: str, device: str, seed: int, *, label_names: list[str] | None = None,
               field: str = "model.path", base: bool = True, nf4: dict[str, Any] | None = None,
               device_map: dict[str, Any] | None = None) -> ModelBundle:
    """The one loader: weights and tokenizer of `spec`, checked (see load_other_model). `base` allows
    a classifier head to be missing (it is initialised, seeded); otherwise every weight must load.

    `nf4` (QLoRA's settings: compute_dtype, double_quant, keep_float) loads the linear layers straight
    into bitsandbytes NF4 from the checkpoint, so the full-precision model never exists in memory;
    the bundle's info then says so (`qlora_base`). Where that cannot work (a GGUF or compress-format
    source, Conv1D layers, no 4-bit kernel here) the float model loads and the stage decides."""
    if (folder := compress_output(spec)) is not None:
        # An earlier run's stage output: its own format, masks and lineage carry on into this run.
        bundle = ModelBundle.load(folder, device=device)
        bundle.model.eval()
        bundle.source = spec.path
        return bundle
    location = model_location(spec)
    dtype = resolve_dtype(spec, load_config(spec), device) if spec.dtype == "auto" else spec.dtype
    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code,
                              "dtype": TORCH_DTYPES[dtype]}
    gguf = gguf_kwargs(spec)
    if gguf:
        from transformers import GgufConfig

        # Dequantize at load: stages need plain nn.Linear weights to prune, train and requantize.
        kwargs.update(gguf, quantization_config=GgufConfig(gguf_file=gguf["gguf_file"], dequantize=True))
    else:
        check_weights_format(spec, field)
        if not spec.allow_pickle:
            kwargs["use_safetensors"] = True  # transformers then refuses .bin weights instead of unpickling them
    if task == "sequence-classification":
        names = label_names
        num_labels = spec.num_labels or (len(names) if names else None)
        if spec.num_labels and names and spec.num_labels < len(names):
            from compress.errors import DataError

            raise DataError(f"model.num_labels: {spec.num_labels} is fewer than the {len(names)} labels in the data "
                            f"({', '.join(names)}); raise it or drop model.num_labels")
        if num_labels:
            kwargs["num_labels"] = num_labels
        if names and len(names) == num_labels:
            kwargs["id2label"] = dict(enumerate(names))
            kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    offload = None
    if device_map is not None:
        kwargs["device_map"] = device_map
        if "disk" in device_map.values():
            offload = _offload_folder()
            kwargs["offload_folder"] = offload.name
    torch.manual_seed(seed)  # a new classifier head is initialised reproducibly
    qlora_base = _nf4_plan(location, spec, task, device, nf4, kwargs) if nf4 and not gguf else None
    try:
        if qlora_base is not None:
            from compress.quant.bnb import linear_subclasses_as_linear

            with linear_subclasses_as_linear():  # Falcon's FalconLinear too (see quant/bnb.py)
                model = from_pretrained_checked(task, location, base=base, **kwargs)
        else:
            model = from_pretrained_checked(task, location, base=base, **kwargs)
        tokenizer = load_tokenizer(location, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                   **gguf)
    except ModelError as exc:
        raise ModelError(f"{field}: {exc}") from None
    except Exception as exc:
        raise ModelError(f"{field}: could not load {spec.path!r} as {task}: {exc}") from None
    if gguf:
        _detach_gguf_quantizer(model)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device_map is not None and qlora_base is None:
        from compress.placement import summary

        model._compress_offload = offload  # the folder lives as long as the model
        placement = summary(device_map, device)
    elif qlora_base is None:
        model.to(device)
    else:
        from compress.quant.bnb_weights import keep_canonical_layout

        keep_canonical_layout(model)  # same numbers on every CPU (see quant/bnb_weights)
    model.eval()
    bundle = ModelBundle(model=model, tokenizer=tokenizer, task=task, source=spec.path)
    if qlora_base is not None:
        bundle.info["qlora_base"] = qlora_base
    elif device_map is not None:
        bundle.info["placement"] = placement
    return bundle


def _offload_folder() -> Any:
    """A new temporary folder for weights transformers must write out to offload them to disk (a
    safetensors checkpoint is read in place; pickle weights, where allowed, are written here; a GGUF is
    refused, see placement_problems). compress creates it, and it is deleted when the model is."""
    import tempfile

    return tempfile.TemporaryDirectory(prefix="compress-offload-")


def _nf4_plan(location: str, spec: ModelSpec, task: str, device: str, nf4: dict[str, Any],
              kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Add the NF4 quantization to `kwargs` and describe it, or None when it cannot be used here.
    The layers to keep in float are read from the model built on the meta device (no memory)."""
    from transformers import AutoConfig

    from compress.bundle import auto_class
    from compress.pruning.targets import is_conv1d
    from compress.quant.bnb import output_format
    from compress.training import adapters as ad

    if ad.bnb_4bit_problem(device) is not None:
        return None
    config = AutoConfig.from_pretrained(location, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        meta = auto_class(task).from_config(config, trust_remote_code=spec.trust_remote_code)
    if any(is_conv1d(m) for m in meta.modules()):
        return None  # transformers' 4-bit loader cannot read Conv1D's transposed weights (finetune says so)
    skip = ad.keep_float(meta) + list(nf4.get("keep_float") or [])
    kwargs["quantization_config"] = ad.nf4_config(compute_dtype=nf4["compute_dtype"],
                                                  double_quant=nf4["double_quant"], skip=skip)
    kwargs["device_map"] = {"": device}
    # The format a float copy of this model saves in (a plain folder, or hf-bnb for e.g. Falcon).
    return {"scheme": "nf4", "float_format": output_format(meta), "kept_float": skip}


def _detach_gguf_quantizer(model: Any) -> None:
    """A dequantized GGUF model is a plain float model, but transformers still marks it as GGUF-quantized
    and refuses to save it. Drop the marker so stage checkpoints save as ordinary safetensors."""
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:  # cannot happen with dequantize=True; guard so a transformers change fails loudly
        raise ModelError(f"model.gguf_file: layers stayed GGUF-packed after loading ({', '.join(packed[:3])})")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
