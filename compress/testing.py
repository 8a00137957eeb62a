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


# A second task over the same vocabulary (composition tests): the topic words decide the label, and a
# sentiment word rides along so the two tasks share their inputs but not their answers.
TOPICS = {"travel": ["car", "road", "train", "trip"], "town": ["city", "weather", "day", "today"],
          "media": ["phone", "report", "news"]}


def topic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` short texts labelled `topic` by the topic words they contain."""
    rng = random.Random(seed)
    fill = [w for w in _FILL if not any(w in words for words in TOPICS.values())]
    names = list(TOPICS)
    rows = []
    for i in range(n):
        topic = names[i % len(names)]
        words = [rng.choice(fill) for _ in range(rng.randint(3, 6))] + [rng.choice(TOPICS[topic]) for _ in range(2)]
        words.append(rng.choice(_POS + _NEG))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topic": topic})
    return rows


def _write_csv(path: str | Path, rows: list[dict[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_topic_csv(path: str | Path, n: int = 300, seed: int = 0) -> Path:
    return _write_csv(path, topic_rows(n, seed))


def write_sentiment_csv(path: str | Path, n: int = 300, seed: int = 0) -> Path:
    return _write_csv(path, sentiment_rows(n, seed))


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
    """A fast recipe over the tiny assets (small eval, few speed repeats, no side-by-side pass)."""
    data: dict[str, Any] = {"source": str(data_path), "max_length": 32, "eval_size": 0.2}
    if task == "sequence-classification":
        data["label_column"] = "label"
    return {
        "name": extra.pop("name", "tiny"),
        "model": {"path": str(model_dir), "task": task},
        "data": {**data, **extra.pop("data", {})},
        # The side-by-side pass (re-loading and re-timing every model) is off unless a test asks for it:
        # it added 8-20 s to a tiny run on the loaded CI machine. When asked for, it stays short, and
        # isolated memory (a fresh process per model) stays off unless asked for too.
        "eval": {"batch_size": 4, "seq_len": 16, "warmup": 1, "repeats": 2, "side_by_side": False, "rounds": 2,
                 "memory": False, "prompt_tokens": 16, "new_tokens": 4, "generate_batch_size": 2,
                 **extra.pop("eval", {})},
        "output_dir": str(output_dir),
        "stages": stages or [],
        **extra,
    }


# ------------------------------------------------------------------------------- architecture matrix

_DECODER = {"vocab_size": None, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 256}
_ENCODER = {"vocab_size": None, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 128}

# model_type -> (task, config fields). Each entry stands for a family trait the stages must handle:
# Conv1D (gpt2), learned positions (opt, bert, roberta, distilbert), scaled embeddings (gemma*),
# fused QKV (falcon, gpt_neox), tied embeddings (llama-tied, qwen2, gemma*), untied (mistral, ...).
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("causal-lm", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 256,
                           "tie_word_embeddings": True}),
    "opt": ("causal-lm", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128,
                          "word_embed_proj_dim": 64, "max_position_embeddings": 256}),
    "qwen2": ("causal-lm", {**_DECODER, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3": ("causal-lm", {**_DECODER, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}),
    "phi3": ("causal-lm", {**_DECODER, "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "gemma2": ("causal-lm", {**_DECODER, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 64,
                             "tie_word_embeddings": True}),
    "gemma3_text": ("causal-lm", {**_DECODER, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 64,
                                  "tie_word_embeddings": True}),
    "mistral": ("causal-lm", {**_DECODER, "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "falcon": ("causal-lm", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True,
                             "bias": False, "alibi": False}),
    "gpt_neox": ("causal-lm", {**_DECODER, "tie_word_embeddings": False}),
    "llama": ("causal-lm", {**_DECODER, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "bert": ("sequence-classification", dict(_ENCODER)),
    "roberta": ("sequence-classification", {**_ENCODER, "max_position_embeddings": 130}),
    "distilbert": ("sequence-classification", {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128,
                                               "max_position_embeddings": 128}),
    "deberta-v2": ("sequence-classification", {**_ENCODER, "relative_attention": True, "pos_att_type":
                                               ["p2c", "c2p"], "position_buckets": 32}),
    "modernbert": ("sequence-classification", {**_ENCODER, "global_attn_every_n_layers": 2,
                                               "local_attention": 16}),
}


def make_tiny_model(model_type: str, path: str | Path, num_labels: int = 3, seed: int = 0) -> Path:
    """Save a 2-layer, hidden-64 model of `model_type` (a key of TINY_ARCHITECTURES) with the tiny
    word-level tokenizer; causal LMs get the `llama` tokenizer, encoders the `bert` one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    task, fields = TINY_ARCHITECTURES[model_type]
    tokenizer = make_tokenizer("llama" if task == "causal-lm" else "bert")
    fields = {k: v for k, v in fields.items() if v is not None}
    if task == "causal-lm":
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    else:  # encoders: some configs default these to ids of a 50k vocabulary
        ids = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
               "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  **ids, **fields)
    if task == "causal-lm":
        auto = AutoModelForCausalLM
    else:
        config.num_labels = num_labels
        auto = AutoModelForSequenceClassification
    torch.manual_seed(seed)
    model = auto.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def prune_bert_encoder_randomly(bundle: Any, seed: int | None = None) -> Any:
    """Zero a random half of a tiny BERT's encoder dense weights and record the masks on `bundle`
    (a pruned base for tests of what later stages do with its zeros). `seed` None: the global RNG."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if name.startswith("bert.encoder") and name.endswith("dense.weight"):
                masks[name] = torch.rand_like(p) > 0.5
                p.mul_(masks[name])
    bundle.masks = masks
    return bundle
