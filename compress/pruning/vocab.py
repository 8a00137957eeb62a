"""Vocabulary trimming: keep only the tokens a domain uses, and the embedding rows behind them.

A 30k-token vocabulary is half of a small encoder like MiniLM, and a tweet corpus uses a fraction of
it. Trimming rewrites the fast tokenizer's `tokenizer.json` (vocabulary, BPE merges, special-token ids
in the post-processor) and selects the matching rows of the input (and output) embeddings, so the
result is a plain Hugging Face folder that reloads without compress.

Written by hand because no maintained library does this for `tokenizers` JSON + transformers models
(TextPruner does it for a few BERT-family classes only, with slow tokenizers).

Why the training texts tokenise exactly as before:
- WordPiece/WordLevel pick the longest matching piece; every piece used on the kept texts is kept, so
  removing other pieces never changes a choice made on those texts.
- BPE keeps every merge whose parts and result are kept, plus the parts of every kept token
  (recursively), so the merges those texts use still apply, in the same order.
Unseen words can tokenise differently (into characters, or [UNK]); `coverage` measures how often.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_MODELS = ("WordPiece", "WordLevel", "BPE", "Unigram")


class VocabError(ValueError):
    """The tokenizer or model cannot be trimmed (the message says why and what to do)."""


@dataclass
class TrimPlan:
    """Old token ids to keep, in their old order (new id = index in `keep`)."""

    keep: list[int]
    old_size: int

    @property
    def old_to_new(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.keep)}


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's JSON, or a VocabError naming what is unsupported."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError("the tokenizer is not a fast (tokenizers) tokenizer; trimming needs tokenizer.json")
    spec = json.loads(backend.to_str())
    kind = spec["model"]["type"]
    if kind not in SUPPORTED_MODELS:
        raise VocabError(f"tokenizer model {kind!r} cannot be trimmed; supported: {', '.join(SUPPORTED_MODELS)}")
    return spec


def vocab_of(spec: dict[str, Any]) -> dict[str, int]:
    """Token -> id of a tokenizer.json spec (Unigram keeps a list of [piece, score])."""
    model = spec["model"]
    if model["type"] == "Unigram":
        return {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    return dict(model["vocab"])


def count_tokens(token_id_lists: Iterable[list[int]]) -> Counter:
    counts: Counter = Counter()
    for ids in token_id_lists:
        counts.update(ids)
    return counts


def plan_trim(tokenizer: Any, counts: Counter, *, min_count: int = 1, texts_chars: set[str] | None = None,
              extra_tokens: Iterable[str] = ()) -> TrimPlan:
    """Which ids to keep: used at least `min_count` times, special and added tokens, `extra_tokens`,
    single characters (all of them for byte-level BPE; those in `texts_chars` otherwise), and for
    BPE the parts every kept token is merged from."""
    spec = tokenizer_spec(tokenizer)
    vocab = vocab_of(spec)
    by_id = {i: t for t, i in vocab.items()}
    keep = {i for i, c in counts.items() if c >= min_count}
    keep |= {a["id"] for a in spec.get("added_tokens", [])}
    keep |= set(tokenizer.all_special_ids)
    missing = [t for t in extra_tokens if t not in vocab]
    if missing:
        raise VocabError(f"keep_tokens: {missing} are not in the tokenizer's vocabulary")
    keep |= {vocab[t] for t in extra_tokens}
    model = spec["model"]
    unk = model.get("unk_token")
    if model["type"] == "Unigram" and model.get("unk_id") is not None:
        keep.add(model["unk_id"])
    elif isinstance(unk, str) and unk in vocab:
        keep.add(vocab[unk])
    prefix = model.get("continuing_subword_prefix") or ""
    byte_level = model["type"] == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    for token, i in vocab.items():
        bare = token[len(prefix):] if prefix and token.startswith(prefix) else token
        if len(bare) == 1 and (byte_level or (texts_chars is not None and bare in texts_chars)):
            keep.add(i)
    if model["type"] == "BPE":
        keep = _merge_closure(keep, vocab, by_id, _merges(model))
    keep = {i for i in keep if i in by_id or i >= len(vocab)}
    return TrimPlan(keep=sorted(keep), old_size=len(tokenizer))


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _merge_closure(keep: set[int], vocab: dict[str, int], by_id: dict[int, str],
                   merges: list[tuple[str, str]]) -> set[int]:
    made_from = {a + b: (a, b) for a, b in merges}
    todo = [by_id[i] for i in keep if i in by_id]
    while todo:
        parts = made_from.get(todo.pop())
        if parts is None:
            continue
        for part in parts:
            if part in vocab and vocab[part] not in keep:
                keep.add(vocab[part])
                todo.append(part)
    return keep


def trimmed_tokenizer_json(spec: dict[str, Any], plan: TrimPlan) -> str:
    """The tokenizer.json with only the kept tokens, renumbered in their old order."""
    spec = json.loads(json.dumps(spec))
    remap = plan.old_to_new
    model = spec["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [pair for i, pair in enumerate(model["vocab"]) if i in remap]
        if model.get("unk_id") is not None:
            model["unk_id"] = remap[model["unk_id"]]
    else:
        model["vocab"] = {t: remap[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1])
                          if i in remap}
    if model["type"] == "BPE":
        kept = set(model["vocab"])
        as_strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
        merges = [(a, b) for a, b in _merges(model) if a in kept and b in kept and a + b in kept]
        model["merges"] = [f"{a} {b}" for a, b in merges] if as_strings else [[a, b] for a, b in merges]
    for added in spec.get("added_tokens", []):
        added["id"] = remap[added["id"]]
    _remap_ids(spec.get("post_processor"), remap)
    return json.dumps(spec, ensure_ascii=False)


def _remap_ids(node: Any, remap: dict[int, int]) -> None:
    """Special-token ids inside post-processors (TemplateProcessing `ids`, BertProcessing `[tok, id]`)."""
    if isinstance(node, dict):
        if isinstance(node.get("ids"), list):
            node["ids"] = [remap[i] for i in node["ids"]]
        for key in ("sep", "cls"):
            if isinstance(node.get(key), list) and len(node[key]) == 2 and isinstance(node[key][1], int):
                node[key][1] = remap[node[key][1]]
        for value in node.values():
            _remap_ids(value, remap)
    elif isinstance(node, list):
        for value in node:
            _remap_ids(value, remap)


def trim_tokenizer(tokenizer: Any, plan: TrimPlan) -> Any:
    """A new fast tokenizer of the same class with only the kept tokens (special tokens carried over)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(trimmed_tokenizer_json(tokenizer_spec(tokenizer), plan))
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if k != "additional_special_tokens"}
    extra = tokenizer.special_tokens_map.get("additional_special_tokens") or []
    new = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
                                  padding_side=tokenizer.padding_side, **special,
                                  **({"additional_special_tokens": extra} if extra else {}))
    new.name_or_path = f"{tokenizer.name_or_path}-trimmed{len(plan.keep)}"
    return new


def embedding_problem(embedding: Any) -> str | None:
    """Why trim-vocab cannot cut rows out of this input embedding, or None when it can: a float
    nn.Embedding, or a subclass that only scales its lookups (Gemma's scaled word embedding)."""
    name = type(embedding).__name__
    if not isinstance(embedding, torch.nn.Embedding) or not embedding.weight.is_floating_point():
        return (f"the input embedding is a {name}, not a float nn.Embedding (already quantized?); "
                f"put trim-vocab before quantize")
    if type(embedding) is torch.nn.Embedding:
        return None
    only_scaled = (set(embedding._parameters) == {"weight"} and set(embedding._buffers) == {"embed_scale"}
                   and not embedding._modules)
    if only_scaled:
        return None
    return (f"the input embedding is a {name}, an nn.Embedding subclass with a forward of its own that "
            f"trim-vocab cannot vouch for; trim-vocab supports nn.Embedding and scaled word embeddings")


def trim_embeddings(model: Any, plan: TrimPlan) -> None:
    """Keep the planned rows of the input embedding (and of an untied output layer); update the config."""
    rows = torch.tensor(plan.keep, dtype=torch.long)
    old_in = model.get_input_embeddings()
    why = embedding_problem(old_in)
    if why:
        raise VocabError(why)
    if old_in.num_embeddings < plan.old_size:
        raise VocabError(f"the embedding has {old_in.num_embeddings} rows but the tokenizer {plan.old_size} "
                         f"tokens; the model and tokenizer do not match")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and out.weight is old_in.weight
    remap = plan.old_to_new
    pad = old_in.padding_idx
    # Rows are cut in place, so a subclass keeps what it adds to the lookup (Gemma's sqrt(hidden)
    # scale); a new nn.Embedding would silently drop it.
    new_in = old_in
    with torch.no_grad():
        new_in.weight = torch.nn.Parameter(old_in.weight[rows.to(old_in.weight.device)].clone(),
                                           requires_grad=old_in.weight.requires_grad)
    new_in.num_embeddings = len(rows)
    new_in.padding_idx = remap.get(pad) if pad is not None else None
    if out is not None and not tied:
        if not isinstance(out, torch.nn.Linear):
            raise VocabError(f"the output layer is a {type(out).__name__}, not a float nn.Linear; "
                             f"put trim-vocab before quantization")
        new_out = torch.nn.Linear(out.in_features, len(rows), bias=out.bias is not None,
                                  dtype=out.weight.dtype, device=out.weight.device)
        with torch.no_grad():
            new_out.weight.copy_(out.weight[rows.to(out.weight.device)])
            if out.bias is not None:
                new_out.bias.copy_(out.bias[rows.to(out.bias.device)])
        model.set_output_embeddings(new_out)
    elif tied:
        model.get_output_embeddings().weight = new_in.weight
    _remap_config(model, remap, len(rows))


def _remap_config(model: Any, remap: dict[int, int], size: int) -> None:
    configs = [model.config, getattr(model, "generation_config", None)]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_config.vocab_size = size
    model.config.vocab_size = size
    for config in configs:
        if config is None:
            continue
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                setattr(config, key, remap.get(value))
            elif isinstance(value, list):
                setattr(config, key, [remap[v] for v in value if v in remap] or None)


__all__ = ["TrimPlan", "VocabError", "count_tokens", "embedding_problem", "plan_trim", "tokenizer_spec", "trim_embeddings",
           "trim_tokenizer", "trimmed_tokenizer_json", "vocab_of"]
