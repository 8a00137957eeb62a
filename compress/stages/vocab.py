"""trim-vocab stage: keep only the tokens the training data uses (and their embedding rows).

The model and tokenizer stay a plain Hugging Face folder (reloads without compress). The stage
checks its own work: on a sample of training texts the new tokenizer must give the same tokens and
the model the same logits as before; it reports how much of the held-out text is still covered.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.errors import StageError
from compress.pruning import vocab as vt
from compress.registry import StageConfig, StageResult, register_stage

_PROBE_TEXTS = 64
# Largest logit change allowed on texts whose tokens were all kept, relative to the largest logit:
# the kept rows are copied bit for bit, so only float summation order may differ (~1e-7 in fp32).
LOGIT_TOLERANCE = 1e-5


class TrimVocab(StageConfig):
    """Trim the vocabulary to the tokens the training data uses; shrinks the embeddings."""

    type: Literal["trim-vocab"] = "trim-vocab"
    min_count: int = Field(1, gt=0, description="Keep tokens seen at least this many times in the "
                                                "training split (special tokens are always kept).")
    keep_characters: bool = Field(True, description="Also keep single-character tokens of characters the "
                                  "training text uses (all of them for byte-level BPE), so unseen words "
                                  "split into characters instead of becoming [UNK].")
    keep_tokens: list[str] = Field(default_factory=list, description="Tokens always kept (e.g. ones a "
                                   "later prompt format needs).")


def _texts(data: Any, split: str) -> list[str]:
    spec, raw = data.spec, getattr(data, split)
    columns = [c for c in (spec.text_column, spec.text_pair_column, spec.prompt_column, spec.completion_column)
               if c and c in raw.column_names]
    return [str(x) for c in columns for x in raw[c] if x is not None]


def check_trim_vocab(bundle: ModelBundle, config: TrimVocab, ctx: RunContext) -> list[str]:
    problems = []
    if ctx.data is None:
        problems.append("trim-vocab: needs a data section (the tokens kept are those the training split uses)")
    try:
        spec = vt.tokenizer_spec(bundle.tokenizer)
    except vt.VocabError as exc:
        return problems + [f"trim-vocab: {exc}"]
    known = vt.vocab_of(spec)
    problems += [f"keep_tokens: {t!r} is not in the tokenizer's vocabulary" for t in config.keep_tokens
                 if t not in known]
    why = vt.embedding_problem(bundle.model.get_input_embeddings())
    if why:
        problems.append(f"trim-vocab: {why}")
    if bundle.format != "hf":
        problems.append(f"trim-vocab: needs a plain Hugging Face model (this one is {bundle.format!r}); "
                        f"put it before quantize or merge adapters first")
    return problems


def _logits(model: Any, tokenizer: Any, texts: list[str], device: str) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(device)
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


def run_trim_vocab(bundle: ModelBundle, config: TrimVocab, ctx: RunContext) -> StageResult:
    data = ctx.require_data("trim-vocab")
    tokenizer, model = bundle.tokenizer, bundle.model
    embedding_name = next((n for n, p in model.named_parameters()
                           if p is model.get_input_embeddings().weight), None)
    if embedding_name in bundle.masks:
        raise StageError("trim-vocab: the embedding carries a pruning mask; trim the vocabulary before pruning it")
    train_texts = _texts(data, "train")
    counts = vt.count_tokens(tokenizer(train_texts, add_special_tokens=True)["input_ids"])
    chars = set("".join(train_texts)) if config.keep_characters else None
    if config.keep_characters and tokenizer.backend_tokenizer.normalizer is not None:
        chars = set(tokenizer.backend_tokenizer.normalizer.normalize_str("".join(sorted(chars))))
    try:
        plan = vt.plan_trim(tokenizer, counts, min_count=config.min_count, texts_chars=chars,
                            extra_tokens=config.keep_tokens)
        new_tokenizer = vt.trim_tokenizer(tokenizer, plan)
    except vt.VocabError as exc:
        raise StageError(f"trim-vocab: {exc}") from exc

    probe = train_texts[:_PROBE_TEXTS]
    remap = plan.old_to_new
    old_ids = tokenizer(probe)["input_ids"]
    new_ids = new_tokenizer(probe)["input_ids"]
    expected = [[remap.get(i, -1) for i in ids] for ids in old_ids]
    if config.min_count == 1 and new_ids != expected:
        bad = next(i for i, (a, b) in enumerate(zip(new_ids, expected, strict=True)) if a != b)
        raise StageError(f"trim-vocab: the trimmed tokenizer splits the training text {probe[bad]!r} "
                         f"differently; please report this with the tokenizer's name")
    # Texts whose every token survived must give the same logits: same rows, same maths.
    same = [text for text, ids in zip(probe, expected, strict=True) if -1 not in ids] or probe[:1]
    before = _logits(model, tokenizer, same, ctx.device)
    try:
        vt.trim_embeddings(model, plan)
    except vt.VocabError as exc:
        raise StageError(f"trim-vocab: {exc}") from exc
    after = _logits(model, new_tokenizer, same, ctx.device)
    if after.shape[-1] != before.shape[-1]:  # a language model's logits cover the vocabulary
        before = before[..., plan.keep]
    change = float((after - before).abs().max()) if after.shape == before.shape else float("inf")
    scale = float(before.abs().max()) or 1.0
    if not change <= LOGIT_TOLERANCE * scale:
        raise StageError(f"trim-vocab: on {len(same)} training texts whose tokens were all kept, the logits "
                         f"changed by {change:.4g} ({change / scale:.3g} of the largest logit; allowed "
                         f"{LOGIT_TOLERANCE:g}): the trimmed embedding does not compute what the old one did")

    eval_ids = tokenizer(_texts(data, "eval"), add_special_tokens=False)["input_ids"] if len(data.eval) else []
    eval_tokens = sum(len(ids) for ids in eval_ids)
    covered = sum(1 for ids in eval_ids for i in ids if i in remap)
    facts = {
        "vocab_before": plan.old_size,
        "vocab_after": len(plan.keep),
        "kept_percent": round(100 * len(plan.keep) / plan.old_size, 2),
        "train_texts": len(train_texts),
        "eval_token_coverage": round(covered / eval_tokens, 5) if eval_tokens else None,
        "probe_max_abs_logit_change": round(change, 6),
    }
    ctx.logger.info("trim-vocab: %d -> %d tokens (%.1f%%); %.2f%% of held-out tokens kept", plan.old_size,
                    len(plan.keep), facts["kept_percent"], 100 * (facts["eval_token_coverage"] or 0))
    out = bundle.replace(model=model, tokenizer=new_tokenizer)
    out.record("trim-vocab", config.model_dump(mode="json"), **facts)
    return StageResult(out, facts)


register_stage(TrimVocab, run_trim_vocab, check=check_trim_vocab)

__all__ = ["TrimVocab", "check_trim_vocab", "run_trim_vocab"]
