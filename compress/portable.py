"""Keep plain transformers from loading a compress-only checkpoint as silent garbage.

A folder in one of compress's own formats (int8-dynamic, weight-only int4/int8, GPTQ, quantized
embeddings, low-rank factors) has a normal-looking config.json. `AutoModelFor*.from_pretrained`
would build the float architecture, find none of the weights it expects under those names,
initialise them at random with a warning, and return a model that agrees with the real one on
0-42% of inputs. transformers has no hook to refuse such a folder (an unknown
`quantization_config` is skipped with a warning), but it does refuse an unknown `model_type`, and
quotes it in its error. So these folders declare a `model_type` that names what to install and
how to load (`MODEL_TYPE`) and keep the real one under `compress.base_model_type`; compress's own
loaders read the config through `read_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import ModelError

# transformers' refusal reads "has model type `<this>` but Transformers does not recognize this
# architecture ... pip install --upgrade transformers": the type itself must say what to install
# instead. The distribution name is the one in pyproject.toml (tests check they agree).
MODEL_TYPE = "compress-hf (install compress-hf, then compress.ModelBundle.load; see the model card)"
# Folders written before the type named the install; still recognised.
LEGACY_MODEL_TYPES = ("compress",)
CONFIG = "config.json"


def mark_compress_only(folder: Path, format_name: str) -> None:
    """Rewrite `folder/config.json` so plain transformers refuses it with an error naming compress."""
    path = folder / CONFIG
    config = json.loads(path.read_text())
    if config.get("model_type") in (MODEL_TYPE, *LEGACY_MODEL_TYPES):
        return
    config["compress"] = {
        "base_model_type": config.get("model_type"),
        "format": format_name,
        "how_to_load": "This checkpoint holds compress's own layers; plain transformers would load it with "
                       "random weights. Load it with compress: compress.ModelBundle.load(folder).",
    }
    config["model_type"] = MODEL_TYPE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_compress_only(folder: Path) -> bool:
    path = Path(folder) / CONFIG
    return path.exists() and json.loads(path.read_text()).get("model_type") in (MODEL_TYPE, *LEGACY_MODEL_TYPES)


def read_config(folder: Path) -> Any:
    """The transformers config of a compress folder, marked or not."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(folder)
    if not is_compress_only(folder):
        return AutoConfig.from_pretrained(str(folder))
    data = json.loads((folder / CONFIG).read_text())
    base = data.pop("compress", {}).get("base_model_type")
    if base not in CONFIG_MAPPING:
        raise ModelError(f"{folder / CONFIG}: compress.base_model_type {base!r} is not a model type this "
                         f"transformers knows; upgrade transformers or re-save the model")
    data["model_type"] = base
    return CONFIG_MAPPING[base].from_dict(data)
