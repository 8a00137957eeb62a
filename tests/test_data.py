"""Data loading: formats, label encoding, stratified splits, tokenisation, clear errors."""

import pytest

from compress.calibration import calibration_blocks
from compress.data import load_data, pad_collate, tokenize
from compress.errors import DataError
from compress.recipe import DataSpec
from compress.testing import make_tokenizer


def test_split_is_stratified_and_labels_sorted(sentiment_csv):
    data = load_data(DataSpec(source=str(sentiment_csv), eval_size=0.2), "sequence-classification", seed=1)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert len(data.train) == 240 and len(data.eval) == 60
    counts = [data.eval["label"].count(i) for i in range(3)]
    assert counts == [20, 20, 20]


def test_limits_and_counts(sentiment_csv):
    data = load_data(DataSpec(source=str(sentiment_csv), eval_size=30, max_train_samples=50,
                              max_eval_samples=10), "sequence-classification")
    assert len(data.train) == 50 and len(data.eval) == 10
    assert len(calibration_blocks(data, make_tokenizer("bert"), 7, seed=3)) == 7


def test_jsonl_and_named_eval_split(tmp_path):
    import json

    rows = [{"sentence": f"good day {i}", "y": i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_data(DataSpec(source=str(tmp_path / "d.jsonl"), text_column="sentence", label_column="y",
                              eval_size=5), "sequence-classification")
    assert data.label_names == ["0", "1"] and len(data.eval) == 5


def test_unknown_eval_split_lists_available(sentiment_csv):
    with pytest.raises(DataError, match=r"data.eval_split: no split 'test'; available: train"):
        load_data(DataSpec(source=str(sentiment_csv), eval_split="test"), "sequence-classification")


def test_eval_size_too_large(sentiment_csv):
    with pytest.raises(DataError, match="data.eval_size: 300 held-out examples leaves nothing to train on"):
        load_data(DataSpec(source=str(sentiment_csv), eval_size=300), "sequence-classification")


def test_prompt_completion_masks_the_prompt(tmp_path):
    import csv

    with open(tmp_path / "pc.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        writer.writerows([["the big cats", "run ."]] * 10)
    spec = DataSpec(source=str(tmp_path / "pc.csv"), prompt_column="prompt", completion_column="completion",
                    eval_size=2)
    data = load_data(spec, "causal-lm")
    tok = make_tokenizer("llama")
    row = tokenize(data.train, tok, spec, "causal-lm")[0]
    prompt_len = len(tok("the big cats")["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    assert row["labels"][prompt_len:] == tok("run .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_lm_blocks_and_padding(lm_text):
    spec = DataSpec(source=str(lm_text), max_length=16)
    data = load_data(spec, "causal-lm")
    tok = make_tokenizer("llama")
    blocks = data.tokenized("train", tok)
    assert all(len(b) == 16 for b in blocks["input_ids"])
    batch = pad_collate(tok)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
                              {"input_ids": [8], "attention_mask": [1], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist()[1] == [8, -100, -100]
    assert batch["attention_mask"].tolist()[1] == [1, 0, 0]


def test_a_small_held_out_split_is_warned_about_with_its_size(sentiment_csv, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="compress"):
        load_data(DataSpec(source=str(sentiment_csv), eval_size=5), "sequence-classification")
    assert "the held-out split has only 5 example(s): one example moves accuracy by 20 points" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress"):
        load_data(DataSpec(source=str(sentiment_csv), eval_size=60), "sequence-classification")
    assert "held-out split" not in caplog.text


def test_whole_float_labels_are_class_ids(tmp_path):
    import csv

    with open(tmp_path / "f.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([[f"good day {i}", float(i % 3)] for i in range(30)])
    data = load_data(DataSpec(source=str(tmp_path / "f.csv"), eval_size=6), "sequence-classification")
    assert data.label_names == ["0", "1", "2"]
    assert sorted(set(data.train["label"])) == [0, 1, 2]
