"""The architecture matrix: every tiny architecture through every stage, each output saved, reloaded
and checked against the stage's promise. Shared by tests/test_architectures.py (which asserts the
declared outcome of every cell) and tests/support_table.py (which writes the README's table from it).

A cell is supported (the stage runs, the output reloads and keeps its promise), refused (a
CompressError whose message contains the declared text) or pending (a known issue #14 bug that another
change fixes; xfail in the tests, marked as pending in the table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress import testing

# case id -> (family, stage fields). Families group the cases the default test run samples once.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("finetune", {"type": "finetune", "method": "lora", "merge": "merge"}),
    "dora": ("finetune", {"type": "finetune", "method": "dora", "merge": "merge"}),
    "qlora": ("finetune", {"type": "finetune", "method": "qlora", "merge": "merge"}),
    "magnitude": ("prune", {"type": "prune", "method": "magnitude", "sparsity": 0.5}),
    "wanda": ("prune", {"type": "prune", "method": "wanda", "sparsity": 0.5}),
    "sparsegpt": ("prune", {"type": "prune", "method": "sparsegpt", "sparsity": 0.5}),
    "wanda-sequential": ("prune", {"type": "prune", "method": "wanda", "sparsity": 0.5, "sequential": True}),
    "owl-wanda": ("prune", {"type": "prune", "method": "wanda", "sparsity": 0.5, "allocation": "owl"}),
    "magnitude-2:4": ("prune", {"type": "prune", "method": "magnitude", "structure": "n:m"}),
    "wanda-2:4": ("prune", {"type": "prune", "method": "wanda", "structure": "n:m"}),
    "sparsegpt-2:4": ("prune", {"type": "prune", "method": "sparsegpt", "structure": "n:m"}),
    "heads": ("structured", {"type": "prune", "structure": "heads", "count": 2}),
    "ffn": ("structured", {"type": "prune", "structure": "ffn", "sparsity": 0.25}),
    "layers": ("structured", {"type": "prune", "structure": "layers", "count": 1}),
    "lowrank": ("lowrank", {"type": "lowrank", "rank": 8}),
    "int8": ("quantize", {"type": "quantize", "scheme": "int8"}),
    "nf4": ("quantize", {"type": "quantize", "scheme": "nf4"}),
    "int8-dynamic": ("quantize", {"type": "quantize", "scheme": "int8-dynamic"}),
    "int4-weight": ("quantize", {"type": "quantize", "scheme": "int4-weight"}),
    "gptq": ("quantize", {"type": "quantize", "scheme": "gptq"}),
    "distill": ("distill", {"type": "distill", "keep_every": 2}),
    "trim-vocab": ("trim-vocab", {"type": "trim-vocab"}),
}
TRAINING = {"max_steps": 2, "batch_size": 4}  # added to finetune and distill cases: promises, not quality

# One case per family in the default run; the rest under @pytest.mark.slow.
REPRESENTATIVE = {"finetune": "lora", "prune": "sparsegpt-2:4", "structured": "layers", "lowrank": "lowrank",
                  "quantize": "int8-dynamic", "distill": "distill", "trim-vocab": "trim-vocab"}

_STRUCTURED_ONLY = ("supports models with separate q/k/v", ("head and FFN removal know separate q/k/v and FFN "
                    "projections only (these fuse them, or are GPT-2's Conv1D); whole layers work"))
_HEADS_BERT = ("derives the head size", ("these size attention from hidden_size / heads; a checkpoint "
               "with fewer heads would not reload"))

# (architecture, case) -> (text the refusal's message contains, the reason as the table states it).
REFUSED: dict[tuple[str, str], tuple[str, str]] = {
    **{(a, c): _STRUCTURED_ONLY for a in ("gpt2", "phi3", "falcon", "gpt_neox", "modernbert")
       for c in ("heads", "ffn")},
    ("modernbert", "layers"): ("layer 1 differs from layer 0", ("ModernBERT builds layer 0 without an "
                               "attention norm, so layers cannot be renumbered into its place")),
    **{(a, "heads"): _HEADS_BERT for a in ("opt", "bert", "roberta", "deberta-v2", "distilbert")},
    ("gpt2", "qlora"): ("cannot do for Conv1D", ("transformers' 4-bit loader cannot place Conv1D weights "
                        "(stored transposed); LoRA and DoRA work")),
    ("modernbert", "distill"): ("layers are not all alike", ("ModernBERT's layer 0 has no attention norm, "
                                "so keep_every cannot move layer 1 into its place; use keep_layers from 0")),
}

# (architecture, case) -> reason: bugs of issue #14 that other changes fix (quantize, lowrank,
# trim-vocab per architecture; the QLoRA merge). xfail(strict=False) until then.
PENDING: dict[tuple[str, str], str] = {}


def outcome(arch: str, case: str) -> str:
    """What the matrix declares for a cell: supported, refused or pending."""
    if (arch, case) in REFUSED:
        return "refused"
    if (arch, case) in PENDING:
        return "pending"
    return "supported"


def stage_fields(case: str) -> dict[str, Any]:
    family, fields = CASES[case]
    return {**fields, **(TRAINING if family in ("finetune", "distill") else {})}


# ------------------------------------------------------------------------------- running a cell


class Assets:
    """Tiny models and data, built once and shared by every cell (module-scoped in the tests)."""

    def __init__(self, root: Path):
        from compress.data import load_data
        from compress.recipe import DataSpec

        self.root = root
        self._models: dict[str, Path] = {}
        csv = testing.write_sentiment_csv(root / "sentiment.csv", n=60)
        text = testing.write_lm_text(root / "lm.txt", n=60)
        self.data = {
            "causal-lm": load_data(DataSpec(source=str(text), max_length=32, eval_size=0.2,
                                            calibration_samples=8), "causal-lm"),
            "sequence-classification": load_data(DataSpec(source=str(csv), max_length=32, eval_size=0.2,
                                                          label_column="label", calibration_samples=8),
                                                 "sequence-classification"),
        }

    def model_dir(self, arch: str) -> Path:
        if arch not in self._models:
            self._models[arch] = testing.make_tiny_model(arch, self.root / "models" / arch)
        return self._models[arch]


def probe_batch(bundle: Any) -> dict[str, torch.Tensor]:
    """A fixed padded batch of the tiny vocabulary's words, the same for every model."""
    texts = ["the happy cats run very good .", "my dogs eat fish"]
    batch = bundle.tokenizer(texts, return_tensors="pt", padding=True)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**{k: v.to(next(model.parameters()).device) for k, v in batch.items()}).logits
    mask = batch["attention_mask"].bool()
    # Padding positions of a causal LM are not a promise of any stage; compare real tokens only.
    return out[mask].float().cpu() if out.dim() == 3 else out.float().cpu()


def run_stage(assets: Assets, arch: str, case: str, work: Path) -> tuple[Any, Any]:
    """(input bundle, output bundle) of one cell. Raises CompressError for a refusal, like the runner:
    the stage's check first, then its run."""
    import compress.stages  # noqa: F401  (registers the stages)
    from compress.bundle import ModelBundle
    from compress.context import RunContext
    from compress.errors import StageError
    from compress.registry import get_stage

    fields = stage_fields(case)
    entry = get_stage(fields["type"])
    config = entry.config_cls(**fields)
    bundle = ModelBundle.load(assets.model_dir(arch))
    before = ModelBundle.load(assets.model_dir(arch))
    ctx = RunContext(output_dir=work, seed=0, device="cpu", data=assets.data[bundle.task], work_dir=work / "work",
                     show_progress=False)
    problems = entry.check(bundle, config, ctx) if entry.check else []
    if problems:
        raise StageError(f"{config.label()}: " + "; ".join(problems))
    return before, entry.run(bundle, config, ctx)


def check_promise(before: Any, result: Any, case: str, folder: Path) -> dict[str, Any]:
    """Save the output, reload it and check what its stage promises. Returns measured facts."""
    out, stage_facts = result.bundle, result.facts
    from compress.bundle import ModelBundle, auto_class
    from compress.pruning.masks import check_nm
    from compress.pruning.targets import oriented

    family, fields = CASES[case]
    batch = probe_batch(out)  # the output's tokenizer: trim-vocab renumbers the tokens
    live = logits(out.model, batch)
    assert torch.isfinite(live).all(), f"{case}: non-finite outputs"
    out.save(folder)
    reloaded = ModelBundle.load(folder)
    assert probe_batch(reloaded)["input_ids"].equal(batch["input_ids"]), f"{case}: reloaded tokenizer differs"
    again = logits(reloaded.model, batch)
    torch.testing.assert_close(again, live, rtol=0, atol=1e-5, msg=lambda m: f"{case}: reload differs: {m}")
    facts: dict[str, Any] = {"max_abs_logit": float(live.abs().max())}
    if family == "prune":
        modules = dict(reloaded.model.named_modules())
        assert reloaded.masks, f"{case}: no masks saved"
        for key, mask in reloaded.masks.items():
            layer = modules[key.removesuffix(".weight")]
            assert not (layer.weight[~mask] != 0).any(), f"{case}: {key} has non-zeros where pruned"
            if fields.get("structure") == "n:m":
                assert check_nm(oriented(layer), 2, 4), f"{case}: {key} breaks 2:4"
        weights = [modules[k.removesuffix(".weight")].weight for k in reloaded.masks]
        facts["sparsity"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert facts["sparsity"] >= 0.49, f"{case}: sparsity {facts['sparsity']:.3f} below 0.5"
    elif family in ("structured", "distill"):
        plain = auto_class(out.task).from_pretrained(str(folder))  # no compress code on the way back
        torch.testing.assert_close(logits(plain, batch), live, rtol=0, atol=1e-5,
                                   msg=lambda m: f"{case}: plain from_pretrained differs: {m}")
        count = sum(p.numel() for p in plain.parameters())
        assert count < sum(p.numel() for p in before.model.parameters()), f"{case}: nothing removed"
        facts["parameters"] = count
    elif family == "finetune":
        change = stage_facts["merge_max_abs_logit_change"]
        bound = 1e-3 if case == "qlora" else 1e-4  # merging out of 4-bit rounds once more
        assert change <= bound * max(1.0, facts["max_abs_logit"]), f"{case}: merge moved logits by {change}"
        facts["merge_change"] = change
    elif family == "trim-vocab":
        assert len(reloaded.tokenizer) < len(before.tokenizer), f"{case}: vocabulary not trimmed"
    return facts
