"""bitsandbytes 4-bit weights in the CPU tile layout (AVX512-BF16 machines) and the merges that read them.

bitsandbytes repacks a Linear4bit weight after its first eval-mode forward on CPUs with AVX512-BF16
(AMD Zen 4, Intel Sapphire Rapids). These tests produce that layout on purpose with bitsandbytes' own
packing function, so they cover it on every CPU, whichever machine runs them.
"""

import pytest
import torch

from compress import ModelBundle
from compress.context import RunContext
from compress.data import load_data
from compress.errors import StageError
from compress.quant import bnb_weights
from compress.recipe import DataSpec
from compress.stages.finetune import Finetune, run_finetune
from compress.training import adapters

bnb = pytest.importorskip("bitsandbytes")


def _layer(weight: torch.Tensor, double_quant: bool = True):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, quant_type="nf4",
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)._quantize("cpu")
    return layer.eval()


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_repacked_weight_dequantizes_to_the_weight_it_holds(double_quant):
    torch.manual_seed(0)
    dense = torch.randn(128, 64)
    layer = _layer(dense, double_quant)
    canonical = bnb_weights.dequantize_weight(layer)
    assert 0.05 < float((canonical - dense).norm() / dense.norm()) < 0.12  # nf4's own rounding

    bnb_weights.pack_like_avx512_cpu(layer)
    assert bnb_weights.is_cpu_packed(layer.weight) and layer.weight.shape == (128, 32)
    repacked = bnb_weights.dequantize_weight(layer)
    # The tile layout keeps absmax in bf16: within bf16 rounding of the canonical values.
    assert float((repacked - canonical).norm() / canonical.norm()) < 5e-3
    assert bnb_weights.is_cpu_packed(layer.weight), "reading must not change the live layer"


def test_keep_canonical_layout_undoes_and_prevents_the_repacking():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_layer(torch.randn(64, 64)), _layer(torch.randn(64, 64)))
    bnb_weights.pack_like_avx512_cpu(model[0])
    assert bnb_weights.keep_canonical_layout(model) == 2
    assert not bnb_weights.is_cpu_packed(model[0].weight) and model[0].weight.shape == (2048, 1)
    with torch.inference_mode():
        model(torch.randn(3, 64))
    assert all(not bnb_weights.is_cpu_packed(m.weight) for m in model)


@pytest.fixture
def qlora_setup(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    """run_finetune(qlora) whose 4-bit base is repacked as an AVX512-BF16 CPU would after the
    inference-mode probe that runs just before the merge."""
    data = load_data(DataSpec(source=str(sentiment_csv), label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification")
    real_probe = __import__("compress.stages.finetune", fromlist=["_probe_logits"])._probe_logits

    def probe_then_repack(model, *args):
        logits = real_probe(model, *args)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit) and not bnb_weights.is_cpu_packed(module.weight):
                bnb_weights.pack_like_avx512_cpu(module)
        return logits

    monkeypatch.setattr("compress.stages.finetune._probe_logits", probe_then_repack)
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work")
    return ModelBundle.load(tiny_bert_dir), ctx


@pytest.mark.parametrize("merge", ["merge", "dequantize-merge-requantize"])
def test_qlora_merges_a_repacked_base_without_changing_the_model(qlora_setup, merge):
    bundle, ctx = qlora_setup
    out = run_finetune(bundle, Finetune(method="qlora", lr=1e-2, max_steps=4, batch_size=16, merge=merge), ctx)
    info = out.facts
    assert info["merge_relative_logit_change"] <= info["merge_tolerance"]
    assert info["merge_top1_agreement"] == 1.0
    if merge == "merge":  # into float: exactly the weights the adapter model ran on
        assert info["merge_relative_logit_change"] < 1e-2 and not adapters.count_bnb(out.bundle.model)


def test_a_merge_that_reads_the_repacked_layout_naively_is_stopped(qlora_setup, monkeypatch):
    """Break the property on purpose: dequantize as peft does (layout-blind); the stage must refuse."""
    from peft.utils.integrations import dequantize_bnb_weight

    bundle, ctx = qlora_setup
    monkeypatch.setattr(adapters, "dequantize_weight", lambda m: dequantize_bnb_weight(m.weight, None))
    with pytest.raises(StageError, match=r"merge \(merge\) changed the model: its logits on held-out inputs "
                                         r"moved by .* of their RMS \(allowed 0.001 for a from-4bit merge"):
        run_finetune(bundle, Finetune(method="qlora", lr=1e-2, max_steps=2, batch_size=16, merge="merge"), ctx)


def test_a_float_merge_that_drops_the_update_is_stopped(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    data = load_data(DataSpec(source=str(sentiment_csv), label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification")
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work")
    monkeypatch.setattr(adapters, "merge_lora", lambda model, masks, requantize: model.unload())
    with pytest.raises(StageError, match=r"allowed 0.0001 for a float merge"):
        run_finetune(ModelBundle.load(tiny_bert_dir), Finetune(lr=5e-2, max_steps=6, batch_size=16), ctx)
