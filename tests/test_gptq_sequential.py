"""GPTQ true_sequential: sub-layers fitted in data order on quantized inputs, the first group as plain GPTQ."""

import pytest
import torch

from compress import ModelBundle, load_recipe
from compress.bundle import auto_class, load_tokenizer
from compress.calibration import calibration_batches, input_hessians
from compress.calibration.sequential import fit_sequentially, input_groups
from compress.context import RunContext
from compress.data import load_data
from compress.quant.format import set_module
from compress.quant.weight_only import WeightOnlyLinear
from compress.stages.quantize import Quantize, run_quantize

BLOCK0 = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _bundle(path):
    model = auto_class("causal-lm").from_pretrained(str(path)).eval()
    return ModelBundle(model=model, tokenizer=load_tokenizer(path), task="causal-lm")


def _ctx(tmp_path, recipe):
    r = load_recipe(recipe)
    return RunContext(output_dir=tmp_path, seed=1, device="cpu", data=load_data(r.data, r.model.task, 0),
                      work_dir=tmp_path / "work", show_progress=False)


def test_sublayers_are_fitted_in_data_order_on_quantized_inputs(tiny_llama_dir, lm_recipe, tmp_path):
    bundle = _bundle(tiny_llama_dir)
    model = bundle.model
    ctx = _ctx(tmp_path, lm_recipe)
    batches = calibration_batches(bundle, ctx.data, 8, 1)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    float_h = input_hessians(model, {n: model.get_submodule(n) for n in names}, batches)
    seen = {}

    def fit(name, module, hessian):  # round to nearest in place of GPTQ: the order and inputs are the test
        seen[name] = hessian
        set_module(model, name, WeightOnlyLinear.from_linear(module, 3, 32))
        return name

    order = [n for n, _ in fit_sequentially(model, {n: model.get_submodule(n) for n in names}, batches, fit,
                                            split_blocks=True)]
    assert order == BLOCK0 + [n.replace("layers.0", "layers.1") for n in BLOCK0]
    for name in names:
        same = torch.equal(seen[name], float_h[name])
        change = float((seen[name] - float_h[name]).norm() / float_h[name].norm())
        # Block 0's q/k/v read the float embeddings either way; every later layer reads quantized outputs.
        if name.startswith("model.layers.0.self_attn.") and not name.endswith("o_proj"):
            assert same, (name, change)
        else:
            assert change > 1e-4, (name, change)


def test_input_groups_join_layers_reading_one_tensor():
    x, y = torch.zeros(1), torch.zeros(1)
    inputs = {"q": x, "k": x, "v": x, "o": y, "gate": x, "down": y}
    assert input_groups(list(inputs), inputs) == [["q", "k", "v"], ["o"], ["gate"], ["down"]]


def test_true_sequential_matches_plain_gptq_on_the_first_group(tiny_llama_dir, lm_recipe, tmp_path):
    ctx = _ctx(tmp_path, lm_recipe)
    dense = _bundle(tiny_llama_dir).model
    ids = torch.randint(3, dense.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = dense(input_ids=ids).logits
    models, errors = {}, {}
    for sequential in (False, True):
        out = run_quantize(_bundle(tiny_llama_dir), Quantize(scheme="gptq", bits=3, group_size=32, act_order=False,
                                                             calibration_samples=16, true_sequential=sequential),
                           ctx)
        assert out.facts["true_sequential"] is sequential
        models[sequential] = out.bundle.model
        with torch.no_grad():
            errors[sequential] = float((out.bundle.model(input_ids=ids).logits - reference).pow(2).mean())
    for name in BLOCK0:
        same = torch.equal(models[False].get_submodule(name).qweight, models[True].get_submodule(name).qweight)
        assert same == (name in BLOCK0[:3]), name
    # Measured (groups of 32, 16 blocks): 3 bits plain 1.483e-3, true-sequential 1.403e-3; 4 bits 2.179e-4
    # and 2.238e-4. Reported only: which wins is not a property of the method on a random model.
    assert errors[True] == pytest.approx(errors[False], rel=0.5), errors


def test_without_splitting_blocks_it_is_sparsegpts_block_sequential_pass(tiny_llama_dir, lm_recipe, tmp_path):
    """fit_sequentially(split_blocks=False) measures exactly what SparseGPT's prune_sequentially does, so
    the pruning loop can become a call of it."""
    from compress.pruning.sparsegpt import prune_sequentially, sparsegpt_prune

    ctx = _ctx(tmp_path, lm_recipe)
    results = []
    for loop in ("prune", "fit"):
        bundle = _bundle(tiny_llama_dir)
        model = bundle.model
        batches = calibration_batches(bundle, ctx.data, 8, 1)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}

        def prune(name, lin, hessian):
            weight, mask = sparsegpt_prune(lin.weight, hessian, 0.5)
            lin.weight.data.copy_(weight)
            return mask

        if loop == "prune":
            masks = dict(prune_sequentially(model, linears, batches, prune))
        else:
            masks = dict(fit_sequentially(model, linears, batches, prune))
        results.append((masks, {n: m.weight.detach().clone() for n, m in linears.items()}))
    for name in results[0][0]:
        assert torch.equal(results[0][0][name], results[1][0][name]), name
        assert torch.equal(results[0][1][name], results[1][1][name]), name
