"""The one calibration pipeline (compress/calibration) and the shared Hessian core (compress/hessian.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compress.bundle import ModelBundle
from compress.calibration import (
    batch_rows,
    calibration_batches,
    calibration_blocks,
    draw_order,
    input_stats,
)
from compress.data import load_data, tokenize
from compress.errors import DataError, StageError
from compress.hessian import HessianError, HessianSum, damped_inverse_factor
from compress.recipe import DataSpec
from compress.testing import make_tokenizer, write_lm_text


class _Counting:
    """A tokenizer that counts the texts it encodes (the cost calibration must bound)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        self.texts += len(text) if isinstance(text, list) else 1
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)


def _lm_data(path, **spec):
    return load_data(DataSpec(source=str(path), max_length=16, eval_size=0.1, **spec), "causal-lm")


def test_documents_tokenised_do_not_grow_with_the_corpus(tmp_path):
    """Issue #18: 16 blocks from 10k documents tokenise as few documents as from 1k (the old
    pipeline tokenised the whole training split: 900 vs 9,000)."""
    counts = {}
    for n in (1_000, 10_000):
        data = _lm_data(write_lm_text(tmp_path / f"lm{n}.txt", n=n))
        tok = _Counting(make_tokenizer("llama"))
        batches = calibration_batches(SimpleNamespace(tokenizer=tok), data, 16, seed=0)
        assert batch_rows(batches) == 16 and all(b["input_ids"].shape[1] == 16 for b in batches)
        counts[n] = tok.texts
    assert counts[1_000] == counts[10_000], counts
    assert counts[1_000] < 100, counts  # 16 blocks of 16 tokens need a few dozen short documents


def test_blocks_are_the_drawn_documents_packed_in_draw_order(lm_text):
    data = _lm_data(lm_text)
    tok = make_tokenizer("llama")
    blocks = calibration_blocks(data, tok, 5, seed=3)
    assert [len(b["input_ids"]) for b in blocks] == [16] * 5
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * 16 for b in blocks)
    stream = []
    for i in draw_order(len(data.train), 3).tolist():
        stream += tok(data.train[i]["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= 5 * 16:
            break
    assert [t for b in blocks for t in b["input_ids"]] == stream[:5 * 16]
    again = calibration_blocks(data, tok, 5, seed=3)
    other = calibration_blocks(data, tok, 5, seed=4)
    assert again == blocks and other != blocks


def test_classification_draws_the_examples_the_old_shuffle_drew(sentiment_csv):
    """One example per block, the same examples as datasets' shuffle(seed) (what both old pipelines drew)."""
    data = load_data(DataSpec(source=str(sentiment_csv), max_length=8), "sequence-classification")
    tok = make_tokenizer("bert")
    blocks = calibration_blocks(data, tok, 7, seed=3)
    expected = tokenize(data.train.shuffle(seed=3).select(range(7)), tok, data.spec, data.task)
    assert [b["input_ids"] for b in blocks] == expected["input_ids"]
    assert [b["labels"] for b in blocks] == expected["labels"]
    assert max(len(b["input_ids"]) for b in blocks) <= 8


def test_a_small_corpus_gives_what_it_has_and_no_block_is_an_error(tmp_path):
    tok = make_tokenizer("llama")
    data = _lm_data(write_lm_text(tmp_path / "small.txt", n=20))
    blocks = calibration_blocks(data, tok, 1000, seed=0)
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in data.train["text"])
    assert len(blocks) == total // 16
    (tmp_path / "tiny.txt").write_text("cats run\ndogs sleep\n")
    tiny = load_data(DataSpec(source=str(tmp_path / "tiny.txt"), max_length=64, eval_size=1), "causal-lm")
    with pytest.raises(DataError, match="data.max_length: the text yields no full block of 64 tokens"):
        calibration_blocks(tiny, tok, 4, seed=0)
    with pytest.raises(StageError, match=r"quantize.calibration_samples: this stage needs calibration data"):
        calibration_batches(SimpleNamespace(tokenizer=tok), None, 4, 0, field="quantize.calibration_samples")


def test_padded_batches_measure_what_one_example_at_a_time_measures(tiny_bert_dir, sentiment_csv):
    """GPTQ and SmoothQuant used to calibrate one unpadded example at a time; in padded batches the
    padding is left out, so the statistics are the same."""
    bundle = ModelBundle.load(tiny_bert_dir)
    data = load_data(DataSpec(source=str(sentiment_csv), max_length=32), "sequence-classification")
    names = [n for n, m in bundle.model.named_modules() if isinstance(m, torch.nn.Linear)][:4]
    modules = {n: bundle.model.get_submodule(n) for n in names}
    batched = calibration_batches(bundle, data, 12, seed=0, batch_size=4)
    assert any(bool((b["attention_mask"] == 0).any()) for b in batched)  # there is padding to leave out
    single = calibration_batches(bundle, data, 12, seed=0, batch_size=1)
    a = input_stats(bundle.model, modules, batched, hessian=True)
    b = input_stats(bundle.model, modules, single, hessian=True)
    for name in names:
        assert a[name].hessian.rows == b[name].hessian.rows
        torch.testing.assert_close(a[name].absmax, b[name].absmax, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[name].mean_hessian(), b[name].mean_hessian(), rtol=1e-4, atol=1e-5)


def test_hessian_sum_is_the_mean_outer_product():
    torch.manual_seed(0)
    x1, x2 = torch.randn(5, 3), torch.randn(2, 7, 3)
    h = HessianSum(3)
    h.add(x1)
    h.add(x2)
    x = torch.cat([x1, x2.reshape(-1, 3)]).double()
    torch.testing.assert_close(h.mean(), (x.T @ x / 19).float())
    assert h.rows == 19 and torch.equal(HessianSum(3).mean(), torch.zeros(3, 3))


def test_damped_inverse_factor_is_the_cholesky_factor_of_the_damped_inverse():
    torch.manual_seed(0)
    x = torch.randn(50, 4)
    x[:, 2] = 0  # an input that never fires
    H = x.T @ x / 50
    W = torch.randn(3, 4)
    W2, U, dead = damped_inverse_factor(W, H, 0.01)
    assert dead.tolist() == [False, False, True, False]
    assert torch.equal(W2[:, 2], torch.zeros(3)) and torch.equal(W2[:, [0, 1, 3]], W[:, [0, 1, 3]])
    damped = H.clone()
    damped[2, 2] = 1
    damped += 0.01 * torch.diag(damped).mean() * torch.eye(4)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped), rtol=1e-4, atol=1e-5)
    assert torch.equal(U, torch.triu(U))


def test_a_hessian_that_damping_cannot_fix_is_refused_by_gptq_and_sparsegpt():
    from compress.pruning.sparsegpt import sparsegpt_prune
    from compress.quant.gptq import gptq_quantize

    W, H = torch.randn(4, 8), -torch.eye(8)  # negative definite: no damping share makes it factorable
    with pytest.raises(HessianError, match="not positive definite"):
        damped_inverse_factor(W, H, 0.01)
    with pytest.raises(ValueError, match="not positive definite.*; raise gptq_damp"):
        gptq_quantize(W, H, 4, 8)
    with pytest.raises(HessianError, match="not positive definite"):
        sparsegpt_prune(W, H, 0.5)
    with pytest.raises(HessianError, match="Hessian has shape \\(4, 4\\), the weight has 8 inputs"):
        damped_inverse_factor(W, torch.eye(4), 0.01)


def test_sparsegpt_names_the_layer_whose_hessian_fails(tiny_llama_dir, lm_text):
    """The stage's refusal carries the layer: break the factorisation on purpose with a negative damping."""
    from compress.pruning.sparsegpt import prune_sequentially, sparsegpt_prune
    from compress.pruning.targets import select_linears

    bundle = ModelBundle.load(tiny_llama_dir)
    batches = calibration_batches(bundle, _lm_data(lm_text), 4, seed=0)
    linears = select_linears(bundle.model, None, None)
    first = next(iter(linears))

    def broken(_name, lin, hessian):
        return sparsegpt_prune(lin.weight, hessian, 0.5, damp=-2.0)[1]

    with pytest.raises(StageError, match=rf"method: sparsegpt: layer {first}: Hessian is not positive definite"):
        list(prune_sequentially(bundle.model, linears, batches, broken))
