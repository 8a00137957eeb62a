"""Folders in compress's own formats refuse to load in plain transformers instead of loading garbage."""

import json
from pathlib import Path

import pytest
import torch

from compress import ModelBundle, run
from compress.portable import MODEL_TYPE, is_compress_only


def _logits(model, ids=torch.tensor([[2, 12, 20, 31, 8, 3]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("stage,fmt", [({"type": "quantize", "scheme": "int8-dynamic"}, "quantized"),
                                       ({"type": "quantize", "scheme": "int4-weight", "group_size": 32},
                                        "quantized"),
                                       ({"type": "lowrank", "rank": 8}, "lowrank")])
def test_compress_only_outputs_are_refused_by_plain_transformers(lm_recipe, stage, fmt, caplog):
    from transformers import AutoModelForCausalLM

    lm_recipe["eval"] = {"speed": False, "accuracy": False, "baseline": False}
    lm_recipe["stages"] = [stage]
    run(lm_recipe, show_progress=False)
    folder = next(Path(lm_recipe["output_dir"]).glob("01-*"))
    config = json.loads((folder / "config.json").read_text())
    assert is_compress_only(folder) and config["model_type"] == MODEL_TYPE
    assert config["compress"]["base_model_type"] == "llama" and config["compress"]["format"] == fmt
    # Before: plain from_pretrained built the float model, initialised the missing layers at random
    # and returned garbage with a warning. Now it refuses, naming compress.
    with pytest.raises(ValueError, match="compress"):
        AutoModelForCausalLM.from_pretrained(str(folder))
    caplog.clear()
    with caplog.at_level("DEBUG"):
        bundle = ModelBundle.load(folder)
    assert bundle.format == fmt and torch.isfinite(_logits(bundle.model)).all()
    # compress reads the real config for the tokenizer too: no "model of type ... to instantiate" warning
    assert not [r for r in caplog.records if "to instantiate a model of type" in r.getMessage()]
    # The refusal quotes the type, so the type names what to install (not "upgrade transformers").
    from compress import DISTRIBUTION

    assert MODEL_TYPE.startswith(f"{DISTRIBUTION} (install {DISTRIBUTION}")
    # A folder written before that (model_type "compress") is still compress's own and still loads.
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "compress"}))
    assert is_compress_only(folder)
    assert torch.equal(_logits(ModelBundle.load(folder).model), _logits(bundle.model))


def test_plain_formats_stay_plain(lm_recipe):
    from transformers import AutoModelForCausalLM

    lm_recipe["eval"] = {"speed": False, "accuracy": False, "baseline": False}
    lm_recipe["stages"] = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    run(lm_recipe, show_progress=False)
    folder = Path(lm_recipe["output_dir"]) / "01-prune"
    assert not is_compress_only(folder)
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert torch.equal(_logits(plain), _logits(ModelBundle.load(folder).model))


def test_an_earlier_runs_compress_only_output_is_a_base_model(lm_recipe, tmp_path):
    """model.path may name a stage folder of an earlier run; plain from_pretrained would have loaded
    its int8 layers as random floats (perplexity of an untrained model) instead."""
    lm_recipe["eval"] = {"speed": False}
    lm_recipe["stages"] = [{"type": "quantize", "scheme": "int8-dynamic"}]
    first = run(lm_recipe, show_progress=False)
    second = dict(lm_recipe, name="second", output_dir=str(tmp_path / "second"), stages=[],
                  model={"path": str(Path(lm_recipe["output_dir"]) / "01-quantize"), "task": "causal-lm"})
    report = run(second, show_progress=False)
    assert report.baseline.accuracy.perplexity == first.final.accuracy.perplexity
    assert report.baseline.size.disk_bytes == first.final.size.disk_bytes
