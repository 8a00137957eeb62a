"""Evaluation core: metric values, size accounting and speed fields."""

import math

import pytest
import torch

from compress.bundle import ModelBundle
from compress.data import load_data
from compress.evaluate import count_parameters, evaluate_accuracy, macro_f1, measure_size, measure_speed
from compress.recipe import DataSpec


def test_macro_f1_matches_hand_computation():
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    labels = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp0 fn1 -> 0.8; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(preds, labels, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(labels, labels, 3) == 1.0


def test_size_counts_zeros_tied_weights_and_disk(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    total = sum(p.numel() for p in model.parameters())
    before = sum(int(torch.count_nonzero(p)) for p in model.parameters())  # the pad embedding row is zero
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    zeros = model.model.layers[0].mlp.up_proj.weight.numel()
    params, nonzero = count_parameters(model)
    assert params == total and nonzero == before - zeros
    model.save_pretrained(tmp_path / "m")
    size = measure_size(model, saved_dir=tmp_path / "m")
    assert size.sparsity == pytest.approx(1 - (before - zeros) / total, abs=1e-6)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    assert size.memory_bytes == 4 * total + buffers
    assert 32 <= size.bits_per_weight < 33  # fp32 plus the safetensors header


def test_speed_reports_medians_and_settings(tiny_llama_dir):
    bundle = ModelBundle.load(tiny_llama_dir)
    speed = measure_speed(bundle.model, bundle.tokenizer, batch_size=3, seq_len=8, warmup=1, repeats=3, threads=1)
    assert speed.threads == 1 and speed.batch_size == 3 and speed.seq_len == 8 and speed.repeats == 3
    assert speed.latency_b1_ms > 0 and speed.latency_bn_ms > 0
    assert speed.throughput_per_s == pytest.approx(3 / (speed.latency_bn_ms / 1000), rel=1e-3)
    assert speed.peak_memory_kind == "cpu-rss-increase" and speed.peak_memory_bytes >= 0


def test_perplexity_is_exp_of_token_loss(tiny_llama_dir, lm_text):
    bundle = ModelBundle.load(tiny_llama_dir)
    data = load_data(DataSpec(source=str(lm_text), max_length=16, eval_size=0.2), "causal-lm")
    dataset = data.tokenized("eval", bundle.tokenizer)
    metrics, preds = evaluate_accuracy(bundle.model, dataset, bundle.tokenizer, "causal-lm")
    assert metrics.perplexity == pytest.approx(math.exp(metrics.eval_loss), rel=1e-4)
    # Random tiny model: perplexity near the vocabulary size, far from 1.
    assert 10 < metrics.perplexity < 10 * len(bundle.tokenizer)
    again, _ = evaluate_accuracy(bundle.model, dataset, bundle.tokenizer, "causal-lm", reference=preds)
    assert again.agreement == 1.0


def test_classification_accuracy_and_agreement(tiny_bert_dir, sentiment_csv):
    bundle = ModelBundle.load(tiny_bert_dir)
    data = load_data(DataSpec(source=str(sentiment_csv), eval_size=0.2), "sequence-classification")
    dataset = data.tokenized("eval", bundle.tokenizer)
    metrics, preds = evaluate_accuracy(bundle.model, dataset, bundle.tokenizer, "sequence-classification",
                                       num_labels=3)
    labels = torch.tensor(dataset["labels"])
    assert metrics.examples == len(dataset) == 60
    assert metrics.accuracy == pytest.approx(float((preds == labels).float().mean()), abs=1e-6)
    flipped = (preds + 1) % 3
    other, _ = evaluate_accuracy(bundle.model, dataset, bundle.tokenizer, "sequence-classification",
                                 reference=flipped)
    assert other.agreement == 0.0


def test_size_sees_pruned_zeros_inside_bitsandbytes_4bit_weights(tiny_llama_dir, lm_text, tmp_path):
    """nf4 packs two weights per byte; the zeros of a 2:4-pruned model must still be counted."""
    from compress import run
    from compress.testing import tiny_recipe

    recipe = tiny_recipe(tiny_llama_dir, lm_text, "causal-lm", tmp_path / "run", eval={"speed": False},
                         stages=[{"type": "prune", "structure": "n:m", "pattern": "2:4"},
                                 {"type": "quantize", "scheme": "nf4"}])
    pruned, quantized = run(recipe, show_progress=False).points[1:]
    assert pruned.size.sparsity > 0.2
    # Every pruned zero survives; a few tiny weights may also round to nf4's zero.
    assert pruned.size.sparsity <= quantized.size.sparsity < pruned.size.sparsity + 0.01
    four_bit = [layer for layer in quantized.size.layers if layer.bits_per_weight < 8]
    assert four_bit and all(layer.nonzero <= layer.parameters // 2 for layer in four_bit)


def test_size_never_caches_a_weight_built_on_access():
    """Quantized layers build `weight` on each access; a count cached by such a tensor's id was later
    handed to whichever layer's temporary reused that id."""
    from compress.evaluate.size import _count_nonzero, layer_sizes

    class BuiltOnAccess(torch.nn.Module):
        def __init__(self, rows: int, nonzero_rows: int):
            super().__init__()
            self.rows, self.nonzero_rows = rows, nonzero_rows
            self.register_buffer("codes", torch.zeros(rows, 8, dtype=torch.int8))

        @property
        def weight(self) -> torch.Tensor:
            w = torch.zeros(self.rows, 8)
            w[: self.nonzero_rows] = 1.0
            return w

    model = torch.nn.Sequential(*(BuiltOnAccess(r, n) for r, n in ((8, 8), (4, 1), (8, 2), (4, 4), (8, 0))))
    cache: dict[int, int] = {}
    sizes = layer_sizes(model, cache)
    assert [(s.parameters, s.nonzero) for s in sizes] == [(64, 64), (32, 8), (64, 16), (32, 32), (64, 0)]
    assert cache == {}  # nothing keyed by a temporary's id
    param = torch.nn.Parameter(torch.ones(3, 3))
    assert _count_nonzero(param, cache) == 9 and cache == {id(param): 9}  # parameters are cached
