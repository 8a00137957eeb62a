"""export stage and `compress export`: each format checked in its own runtime, refusals before work,
and every check broken on purpose to see it fail."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import run
from compress.bundle import ModelBundle
from compress.errors import RecipeError, StageError

pytest.importorskip("onnxruntime")
pytest.importorskip("compressed_tensors")

FAST_EVAL = {"speed": False}


def _export_facts(out, name):
    return json.loads((out / "exports" / name / "export.json").read_text())


def _run_without_compress(code: str, cwd) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where `import compress` fails (as a user without compress)."""
    guard = "import sys\nsys.modules['compress'] = None\n"
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, cwd=cwd,
                          check=False, timeout=600)


@pytest.mark.slow
def test_onnx_fp32_and_int8_export_run_in_onnx_runtime_without_compress(cls_recipe):
    cls_recipe["eval"] = FAST_EVAL
    cls_recipe["stages"] = [
        {"type": "export", "format": "onnx", "name": "fp32", "quantize": "none", "evaluate": False, "repeats": 2},
        {"type": "export", "format": "onnx", "name": "int8", "evaluate": False, "repeats": 2},
    ]
    run(cls_recipe, show_progress=False)
    out = Path(cls_recipe["output_dir"])
    fp32, int8 = _export_facts(out, "fp32"), _export_facts(out, "int8")
    assert fp32["max_rel_logit_diff"] <= 1e-4 and fp32["top1_agreement"] == 1.0
    assert fp32["source"] == "the PyTorch model as it is (float)"
    # ORT's attention fusion found its pattern (it does not on the dynamo exporter's graph), and the
    # fused graph still computes the model: the parity above and the padded-batch run below.
    assert fp32["exporter"] == "torch.onnx TorchScript exporter, eager attention"
    assert re.search(r"(^|, )Attention [1-9]", fp32["fused_ops"]), fp32["fused_ops"]
    assert int8["quantize"] == "int8" and int8["accuracy_drop_pt"] <= 1.0 and int8["top1_agreement"] >= 0.95
    assert int8["file_bytes"] < fp32["file_bytes"]
    assert {"latency_b1_ms_onnxruntime", "latency_b32_ms_pytorch"} <= set(int8)
    # The folder runs as its HOW_TO_LOAD.md says, in a Python without compress, and gives PyTorch's logits.
    bundle = ModelBundle.load(out / "01-export")
    texts = ["good movie", "terrible plot and bad acting"]
    batch = bundle.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bundle.model(**batch).logits.numpy()
    folder = out / "exports" / "fp32"
    snippet = (folder / "HOW_TO_LOAD.md").read_text().split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('["an example"]', repr(texts)).replace("return_tensors=\"np\")",
                                                                        "return_tensors='np', padding=True)")
    done = _run_without_compress(snippet + "\nimport numpy; numpy.save('got.npy', logits)\n", folder)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(folder / "got.npy"), expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.slow
def test_onnx_export_of_compress_int8_states_its_float_source(cls_recipe):
    cls_recipe["eval"] = FAST_EVAL
    cls_recipe["stages"] = [{"type": "quantize", "scheme": "int8-dynamic", "evaluate": False},
                            {"type": "export", "format": "onnx", "evaluate": False, "repeats": 2}]
    run(cls_recipe, show_progress=False)
    facts = _export_facts(Path(cls_recipe["output_dir"]), "onnx")
    assert "DynamicInt8Linear layers" in facts["source"] and "dequantized weights" in facts["source"]
    assert facts["fp32_graph_max_rel_logit_diff"] <= 1e-4
    assert facts["accuracy_drop_pt"] <= 1.0


def _direct_context(cls_recipe, tmp_path):
    from compress.context import RunContext
    from compress.data import load_data
    from compress.recipe import load_recipe

    recipe = load_recipe(cls_recipe)
    data = load_data(recipe.data, "sequence-classification", 0)
    return RunContext(output_dir=tmp_path / "direct", seed=0, device="cpu", data=data)


def _flipped(model):
    """A copy of a classifier whose predictions differ from the model's (negated head)."""
    import copy

    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.classifier.weight.mul_(-1)
        bad.classifier.bias.mul_(-1).add_(1.0)
    return bad


@pytest.mark.slow
def test_onnx_graph_that_does_not_compute_the_model_is_refused(cls_recipe, tiny_bert_dir, tmp_path, monkeypatch):
    from compress.export import onnx as onnx_export
    from compress.stages.export import Export, run_export

    real = onnx_export.export_graph
    monkeypatch.setattr(onnx_export, "export_graph",
                        lambda model, sample, path, **kw: real(_flipped(model), sample, path, **kw))
    bundle = ModelBundle.load(tiny_bert_dir)
    with pytest.raises(StageError, match=r"fp32 graph's logits differ from PyTorch's by .* of the largest logit; "
                                         r"allowed 0.0001"):
        run_export(bundle, Export(format="onnx", quantize="none", repeats=1), _direct_context(cls_recipe, tmp_path))
    assert not (tmp_path / "direct" / "exports" / "onnx").exists()  # nothing half-written is left


@pytest.mark.slow
def test_onnx_torchscript_graph_that_does_not_compute_the_model_falls_back_to_dynamo(cls_recipe, tiny_bert_dir,
                                                                                    tmp_path, monkeypatch):
    from compress.export import onnx as onnx_export
    from compress.stages.export import Export, run_export

    real = onnx_export._export_torchscript
    monkeypatch.setattr(onnx_export, "_export_torchscript",
                        lambda model, sample, path, fixed: real(_flipped(model), sample, path, fixed))
    bundle = ModelBundle.load(tiny_bert_dir)
    facts = run_export(bundle, Export(format="onnx", quantize="none", repeats=1),
                       _direct_context(cls_recipe, tmp_path)).facts
    assert facts["exporter"] == "torch.onnx dynamo exporter"
    assert facts["fp32_graph_max_rel_logit_diff"] <= 1e-4


@pytest.mark.slow
def test_onnx_int8_graph_that_loses_accuracy_is_refused(cls_recipe, tiny_bert_dir, tmp_path, monkeypatch):
    from compress.export import onnx as onnx_export
    from compress.stages.export import Export, run_export

    bundle = ModelBundle.load(tiny_bert_dir)
    bad_float = tmp_path / "bad.onnx"
    batch = {k: v for k, v in bundle.tokenizer(["a b"], return_tensors="pt").items()}
    onnx_export.export_graph(_flipped(bundle.model), batch, bad_float)
    real = onnx_export.quantize_graph
    monkeypatch.setattr(onnx_export, "quantize_graph", lambda src, dst, per_channel: real(bad_float, dst, per_channel))
    with pytest.raises(StageError, match=r"int8 graph in ONNX Runtime scores .* agrees on .* of top-1 predictions "
                                         r"\(needed 95%\)"):
        run_export(bundle, Export(format="onnx", repeats=1), _direct_context(cls_recipe, tmp_path))


@pytest.mark.slow
def test_compressed_tensors_gptq_reloads_in_plain_transformers_exactly(lm_recipe):
    lm_recipe["eval"] = FAST_EVAL
    lm_recipe["stages"] = [{"type": "quantize", "scheme": "gptq", "evaluate": False},
                           {"type": "export", "format": "compressed-tensors", "evaluate": False}]
    run(lm_recipe, show_progress=False)
    out = Path(lm_recipe["output_dir"])
    facts = _export_facts(out, "compressed-tensors")
    assert facts["schemes"].startswith("W4A16-asym") and facts["max_rel_weight_diff"] == 0.0
    assert facts["max_rel_logit_diff"] <= 1e-5 and facts["top1_agreement"] == 1.0
    config = json.loads((out / "exports" / "compressed-tensors" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "naive-quantized"
    weights = next(iter(qc["config_groups"].values()))["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (4, False, "group")
    assert config["model_type"] == "llama"  # a plain transformers folder, not compress's own format


@pytest.mark.slow
def test_compressed_tensors_w8a8_and_pruned_zeros(cls_recipe):
    cls_recipe["eval"] = FAST_EVAL
    cls_recipe["stages"] = [{"type": "prune", "structure": "n:m", "pattern": "2:4", "evaluate": False},
                            {"type": "quantize", "scheme": "int8-dynamic", "evaluate": False},
                            {"type": "export", "format": "compressed-tensors", "evaluate": False}]
    run(cls_recipe, show_progress=False)
    out = Path(cls_recipe["output_dir"])
    facts = _export_facts(out, "compressed-tensors")
    assert facts["schemes"].startswith("W8A8") and facts["max_rel_weight_diff"] == 0.0
    assert facts["max_rel_logit_diff"] <= 0.05
    assert facts["pruned_zero_fraction"] and min(facts["pruned_zero_fraction"].values()) >= 0.5
    qc = json.loads((out / "exports" / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    assert group["input_activations"]["strategy"] == "token" and group["weights"]["num_bits"] == 8


@pytest.mark.slow
def test_compressed_tensors_with_wrong_scales_is_refused(cls_recipe, tiny_bert_dir, tmp_path, monkeypatch):
    from compress.export import compressed
    from compress.quant.dynamic import DynamicInt8Linear
    from compress.quant.format import set_module
    from compress.stages.export import Export, run_export

    bundle = ModelBundle.load(tiny_bert_dir)
    name = "bert.encoder.layer.0.output.dense"
    set_module(bundle.model, name, DynamicInt8Linear.from_linear(bundle.model.get_submodule(name)))
    bundle.format = "quantized"
    real = compressed._fill_qparams

    def off_by_one(target, module):
        real(target, module)
        target.weight_scale.mul_(1.01)

    monkeypatch.setattr(compressed, "_fill_qparams", off_by_one)
    with pytest.raises(StageError, match=rf"layer {name} reloads with different weights"):
        run_export(bundle, Export(format="compressed-tensors"), _direct_context(cls_recipe, tmp_path))


def test_export_refusals_come_before_any_work(cls_recipe, monkeypatch):
    from compress.export import runtime

    cls_recipe["stages"] = [{"type": "export", "format": "gguf"}]
    with pytest.raises(RecipeError, match="gguf export is for causal-lm models, this one is sequence-classification"):
        run(cls_recipe, show_progress=False)
    cls_recipe["stages"] = [{"type": "export", "format": "onnx"}, {"type": "quantize", "scheme": "int8-dynamic"}]
    with pytest.raises(RecipeError, match=r"stages\[0\]: export is terminal; only other export stages may follow"):
        run(cls_recipe, show_progress=False)
    cls_recipe["stages"] = [{"type": "export", "format": "compressed-tensors", "quantize": "int8"}]
    with pytest.raises(RecipeError, match="quantize: applies to format onnx only"):
        run(cls_recipe, show_progress=False)
    real = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    cls_recipe["stages"] = [{"type": "export", "format": "onnx"}]
    with pytest.raises(RecipeError, match=r"needs onnxruntime, .* pip install 'compress-hf\[export\]'"):
        run(cls_recipe, show_progress=False)


@pytest.mark.slow
def test_cli_exports_a_finished_run(cls_recipe, capsys):
    from compress.cli import main

    cls_recipe["eval"] = FAST_EVAL
    cls_recipe["stages"] = [{"type": "quantize", "scheme": "int8-dynamic", "evaluate": False}]
    run(cls_recipe, show_progress=False)
    out = Path(cls_recipe["output_dir"])
    assert main(["export", str(out), "--format", "gguf"]) == 2
    assert "gguf export is for causal-lm models" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "compressed-tensors", "--quantize", "none"]) == 2
    assert "quantize: applies to format onnx only" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "compressed-tensors", "--eval-samples", "16"]) == 0
    printed = capsys.readouterr().out
    assert "exported 01-quantize as compressed-tensors" in printed
    facts = _export_facts(out, "compressed-tensors")
    assert facts["schemes"].startswith("W8A8") and facts["max_rel_weight_diff"] == 0.0
    # The run folder still belongs to compress: a rerun with --overwrite may replace it.
    run(cls_recipe, overwrite=True, show_progress=False)
