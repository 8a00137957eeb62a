"""Tiny models and data sets, built offline, for tests and examples.

The data has a real, learnable signal (sentiment words decide the label; the LM text follows a
small grammar), so tests can assert that training helps and that compression hurts, not only
that code ran.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]"]
_POS = ["good", "great", "happy", "love", "excellent", "nice", "wonderful", "fine"]
_NEG = ["bad", "awful", "sad", "hate", "terrible", "poor", "horrible", "worse"]
_NEU = ["car", "road", "today", "city", "train", "weather", "phone", "report"]
_FILL = ["the", "a", "this", "my", "is", "was", "very", "so", "it", "and", "really", "day", "trip", "news"]
LABELS = ["negative", "neutral", "positive"]


def vocabulary() -> list[str]:
    words = sorted(set(_POS + _NEG + _NEU + _FILL + ["." , "cats", "dogs", "run", "sleep", "eat", "fish",
                                                      "birds", "fly", "see", "big", "small", "red", "blue"]))
    return SPECIALS + words


def make_tokenizer(style: str = "bert") -> Any:
    """A word-level fast tokenizer over the tiny vocabulary. `bert` adds [CLS]/[SEP]; `llama` adds [BOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` short texts whose label is decided by the sentiment words they contain."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        pool = {"negative": _NEG, "neutral": _NEU, "positive": _POS}[label]
        words = [rng.choice(_FILL) for _ in range(rng.randint(3, 7))] + [rng.choice(pool) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def lm_sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences from a small grammar: predictable enough for a tiny LM to learn."""
    rng = random.Random(seed)
    subjects, verbs = ["cats", "dogs", "birds", "fish"], ["run", "sleep", "eat", "fly", "see"]
    adjs = ["big", "small", "red", "blue", "happy", "sad"]
    out = []
    for _ in range(n):
        out.append(f"the {rng.choice(adjs)} {rng.choice(subjects)} {rng.choice(verbs)} . "
                   f"my {rng.choice(subjects)} {rng.choice(verbs)} very {rng.choice(['good', 'bad'])} .")
    return out


def write_sentiment_csv(path: str | Path, n: int = 300, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment_rows(n, seed))
    return path


def write_lm_text(path: str | Path, n: int = 400, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lm_sentences(n, seed)) + "\n", encoding="utf-8")
    return path


def make_tiny_bert(path: str | Path, num_labels: int = 3, seed: int = 0, **overrides: Any) -> Path:
    """Save a 2-layer, hidden-64 BERT classifier with its tokenizer to `path`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = make_tokenizer("bert")
    settings = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128,
                "num_labels": num_labels, "pad_token_id": tokenizer.pad_token_id, **overrides}
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**settings))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def make_tiny_llama(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a 2-layer, hidden-64 Llama causal LM (grouped-query attention) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer("llama")
    settings = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                "max_position_embeddings": 256, "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "tie_word_embeddings": False, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def tiny_recipe(model_dir: str | Path, data_path: str | Path, task: str, output_dir: str | Path,
                stages: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """A fast recipe over the tiny assets (small eval, few speed repeats)."""
    data: dict[str, Any] = {"source": str(data_path), "max_length": 32, "eval_size": 0.2}
    if task == "sequence-classification":
        data["label_column"] = "label"
    return {
        "name": extra.pop("name", "tiny"),
        "model": {"path": str(model_dir), "task": task},
        "data": {**data, **extra.pop("data", {})},
        "eval": {"batch_size": 4, "seq_len": 16, "warmup": 1, "repeats": 2, **extra.pop("eval", {})},
        "output_dir": str(output_dir),
        "stages": stages or [],
        **extra,
    }
