"""ONNX export of a causal LM: fp32 and int4 MatMulNBits graphs checked by perplexity in ONNX Runtime,
refusals before work, and each check broken on purpose."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import run
from compress.bundle import ModelBundle
from compress.errors import RecipeError, StageError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAST_EVAL = {"speed": False}


def _facts(out: Path, name: str) -> dict:
    return json.loads((out / "exports" / name / "export.json").read_text())


def _direct(lm_recipe, tmp_path):
    from compress.context import RunContext
    from compress.data import load_data
    from compress.recipe import load_recipe

    recipe = load_recipe(lm_recipe)
    return RunContext(output_dir=tmp_path / "direct", seed=0, device="cpu",
                      data=load_data(recipe.data, "causal-lm", 0))


@pytest.mark.slow
def test_onnx_lm_fp32_and_int4_match_pytorch_perplexity_and_run_without_compress(lm_recipe):
    lm_recipe["eval"] = FAST_EVAL
    lm_recipe["stages"] = [
        {"type": "export", "format": "onnx", "name": "fp32", "quantize": "none", "evaluate": False, "repeats": 1},
        {"type": "export", "format": "onnx", "name": "int4", "evaluate": False, "repeats": 1},
    ]
    run(lm_recipe, show_progress=False)
    out = Path(lm_recipe["output_dir"])
    fp32, int4 = _facts(out, "fp32"), _facts(out, "int4")
    assert fp32["quantize"] == "none" and fp32["matmul_nbits_nodes"] == 0
    assert fp32["ppl_rel_diff"] <= 1e-3 and fp32["fp32_graph_max_rel_logit_diff"] <= 1e-4
    # int4 by default for a causal LM: every linear layer (2 blocks x 7, and lm_head) becomes MatMulNBits.
    assert int4["quantize"] == "int4" and int4["matmul_nbits_nodes"] == 15 and int4["block_size"] == 32
    assert int4["int4_codes"] == "onnxruntime (half-quadratic (HQQ))"
    assert 0 < int4["ppl_rel_diff"] <= 0.10 and int4["tolerances"]["max_ppl_diff"] == 0.10
    assert int4["file_bytes"] < 0.7 * fp32["file_bytes"]
    # The graph carries its KV cache: tokens fed one at a time give its whole-sequence logits.
    assert int4["kv_cache"] is True and int4["kv_decode_max_rel_logit_diff"] <= 1e-3
    assert int4["decode_tokens_per_s_onnxruntime"] > 0 and int4["decode_tokens_per_s_pytorch"] > 0
    # The fp32 folder runs as its HOW_TO_LOAD.md says (greedy decoding through the graph's KV cache), in
    # a Python without compress, and generates what PyTorch generates greedily.
    folder = out / "exports" / "fp32"
    snippet = (folder / "HOW_TO_LOAD.md").read_text().split("```python\n")[1].split("```")[0]
    code = "import sys\nsys.modules['compress'] = None\n" + snippet.replace("print(tokenizer.decode(ids[0]))",
                                                                           "print(ids[0].tolist())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    bundle = ModelBundle.load(out / "01-export")
    ids = bundle.tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = bundle.model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected[0].tolist()


@pytest.mark.slow
def test_onnx_lm_perplexity_check_fails_when_broken(lm_recipe, tiny_llama_dir, tmp_path, monkeypatch):
    from compress.export import onnx_kv
    from compress.stages.export import Export, run_export

    bundle = ModelBundle.load(tiny_llama_dir)
    ctx = _direct(lm_recipe, tmp_path)
    # Zero tolerance: int4 rounding moves the perplexity, so the check must refuse with both numbers.
    with pytest.raises(StageError, match=r"ONNX Runtime's perplexity of the int4 graph is [\d.]+, PyTorch's of the "
                                         r"model is [\d.]+ on the same \d+ x 32 held-out tokens: [\d.]+% apart "
                                         r"\(allowed 0%, max_ppl_diff\)"):
        run_export(bundle, Export(format="onnx", max_ppl_diff=0.0, ppl_ctx=32, ppl_chunks=4, repeats=1), ctx)
    assert not (tmp_path / "direct" / "exports" / "onnx").exists()  # nothing half-written is left
    # A graph that does not compute the model (its output head negated) is refused before quantizing.
    real = onnx_kv.export_kv_graph

    def flipped(model, path):
        import copy

        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.lm_head.weight.mul_(-1)
        return real(bad, path)

    monkeypatch.setattr(onnx_kv, "export_kv_graph", flipped)
    with pytest.raises(StageError, match=r"fp32 graph's logits differ from PyTorch's by .* allowed 0.0001, "
                                         r"max_rel_logit_diff"):
        run_export(bundle, Export(format="onnx", quantize="none", ppl_ctx=32, ppl_chunks=4, repeats=1), ctx)
    monkeypatch.setattr(onnx_kv, "export_kv_graph", real)
    # A cache that does not carry the state (each call sees an empty cache) fails the decode check.
    real_run = onnx_kv.run_cached
    monkeypatch.setattr(onnx_kv, "run_cached", lambda sess, config, ids, cache=None: real_run(sess, config, ids))
    with pytest.raises(StageError, match=r"tokens fed one at a time through its KV cache differ from its logits for "
                                         r"the whole sequence by .* \(allowed 0.001\)"):
        run_export(bundle, Export(format="onnx", quantize="none", ppl_ctx=32, ppl_chunks=4, repeats=1), ctx)
    monkeypatch.setattr(onnx_kv, "run_cached", real_run)
    # An architecture whose cache does not trace gets a prefill-only graph, and says why.
    monkeypatch.setattr(onnx_kv, "export_kv_graph", lambda model, path: (_ for _ in ()).throw(
        RuntimeError("cannot trace this cache")))
    facts = run_export(bundle, Export(format="onnx", quantize="none", ppl_ctx=32, ppl_chunks=4, repeats=1), ctx).facts
    assert "kv_cache" not in facts and "prefill only" in facts["decode_note"]
    assert "RuntimeError: cannot trace this cache" in facts["decode_note"] and facts["ppl_rel_diff"] <= 1e-3


@pytest.mark.slow
def test_onnx_lm_from_compress_int4_writes_its_own_codes(lm_recipe, tmp_path, monkeypatch):
    """compress's int4 codes go into MatMulNBits as they are: the graph computes compress's model (its
    perplexity to the float tolerance), and wrong zero points are caught by the logit check."""
    lm_recipe["eval"] = FAST_EVAL
    lm_recipe["stages"] = [{"type": "quantize", "scheme": "int4-weight", "evaluate": False},
                           {"type": "export", "format": "onnx", "evaluate": False, "repeats": 1, "ppl_ctx": 32,
                            "ppl_chunks": 4}]
    run(lm_recipe, show_progress=False)
    out = Path(lm_recipe["output_dir"])
    facts = _facts(out, "onnx")
    assert facts["int4_codes"] == "compress's own" and "written into MatMulNBits as they are" in facts["source"]
    # 2 blocks x 7 linear layers; lm_head stays float, as compress's quantize stage left it.
    assert facts["matmul_nbits_nodes"] == 14 and facts["tolerances"]["max_ppl_diff"] == 1e-3
    assert facts["ppl_rel_diff"] <= 1e-3
    from compress.export import onnx_nbits
    from compress.stages.export import Export, run_export

    real = onnx_nbits.pack_zero_points
    monkeypatch.setattr(onnx_nbits, "pack_zero_points", lambda zeros: real((zeros.int() + 1).clamp(max=15)))
    with pytest.raises(StageError, match=r"MatMulNBits graph's logits differ from compress's int4 model's by .* "
                                         r"the written codes, scales or zero points are not compress's"):
        run_export(ModelBundle.load(out / "01-quantize"), Export(format="onnx", ppl_ctx=32, ppl_chunks=4, repeats=1),
                   _direct(lm_recipe, tmp_path))


@pytest.mark.slow
def test_onnx_lm_int4_from_compress_int8_weight_is_rounded_by_ort_with_the_reason(lm_recipe):
    lm_recipe["eval"] = FAST_EVAL
    lm_recipe["stages"] = [{"type": "quantize", "scheme": "int8-weight", "evaluate": False},
                           {"type": "export", "format": "onnx", "evaluate": False, "repeats": 1, "ppl_ctx": 32,
                            "ppl_chunks": 4, "int4_algorithm": "rtn"}]
    run(lm_recipe, show_progress=False)
    facts = _facts(Path(lm_recipe["output_dir"]), "onnx")
    assert facts["int4_codes"] == "onnxruntime (round-to-nearest)" and facts["matmul_nbits_nodes"] == 15
    assert "MatMulNBits quantizer rounds them again (block 32)" in facts["source"]
    assert "int8 weight-only (written as int4 MatMulNBits only)" in facts["source"]
    assert facts["ppl_rel_diff"] <= 0.10


@pytest.mark.parametrize("stage, message", [
    ({"quantize": "int8"}, r"quantize: int8 is not offered for causal-lm models .* use quantize int4 or none"),
    ({"per_channel": False}, "per_channel: applies to classifiers only"),
    ({"block_size": 48}, "block_size: 48 is not a power of two"),
    ({"quantize": "none", "symmetric": True}, "symmetric: only used with quantize: int4"),
    ({"symmetric": True}, ("symmetric: HQQ fits a zero point per block, so it has no symmetric form; set "
                           "int4_algorithm: rtn")),
    ({"quantize": "none", "int4_algorithm": "rtn"}, "int4_algorithm: only used with quantize: int4"),
    ({"bench_rounds": 2}, "bench_rounds: applies to format gguf only"),
])
def test_onnx_lm_refusals_come_before_any_work(lm_recipe, stage, message):
    lm_recipe["stages"] = [{"type": "export", "format": "onnx", **stage}]
    with pytest.raises(RecipeError, match=message):
        run(lm_recipe, show_progress=False)
    assert not (Path(lm_recipe["output_dir"]) / "exports").exists()


def test_onnx_int4_refused_for_a_classifier(cls_recipe):
    cls_recipe["stages"] = [{"type": "export", "format": "onnx", "quantize": "int4"}]
    with pytest.raises(RecipeError, match=r"quantize: int4 is not offered for sequence-classification .* use "
                                          r"quantize int8 or none"):
        run(cls_recipe, show_progress=False)
    cls_recipe["stages"] = [{"type": "export", "format": "onnx", "ppl_ctx": 64}]
    with pytest.raises(RecipeError, match="ppl_ctx: applies to causal LMs only"):
        run(cls_recipe, show_progress=False)
