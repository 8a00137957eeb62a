"""Shared fixtures: everything offline, tiny models built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from compress import testing  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return testing.make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return testing.make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    return testing.write_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", n=300)


@pytest.fixture(scope="session")
def lm_text(tmp_path_factory):
    return testing.write_lm_text(tmp_path_factory.mktemp("data") / "lm.txt", n=400)


@pytest.fixture
def cls_recipe(tiny_bert_dir, sentiment_csv, tmp_path):
    """A recipe dict for the tiny classifier; tests add stages and tweak fields."""
    return testing.tiny_recipe(tiny_bert_dir, sentiment_csv, "sequence-classification", tmp_path / "run")


@pytest.fixture
def lm_recipe(tiny_llama_dir, lm_text, tmp_path):
    return testing.tiny_recipe(tiny_llama_dir, lm_text, "causal-lm", tmp_path / "run")
