"""Sentiment showcase: runs recipes/sentiment-showcase.yaml and holds its final model against the
fine-tuned 6-layer teacher from the same run.

Targets (issue #8): the final model keeps >= 97% of the teacher's accuracy, is >= 8x smaller on disk,
>= 4x faster at batch 32 and >= 2x faster at batch 1. Teacher and final model are loaded into one
process and timed round-robin on the same threads (so machine noise hits both alike); the speed-up
is the median of the per-round ratios. Disk size counts every file a user downloads (weights,
tokenizer, config), not only the weights.

Writes reports/sentiment-showcase/ (the run's report.md/html/json and plots, plus showcase.md/json).

    python -m bench.bench_showcase           # ~20-25 min on 2 idle cores
    python -m bench.bench_showcase --time    # re-time an existing run only
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.common import CACHE, REPORTS, ROOT, interleaved_latency, machine_line

RECIPE = ROOT / "recipes" / "sentiment-showcase.yaml"
RUN_DIR = CACHE / "sentiment-showcase"
OUT = REPORTS / "sentiment-showcase"
TIMING = {"seq_len": 64, "warmup": 3, "rounds": {32: 15, 1: 60}}
TARGETS = {"accuracy_kept": 0.97, "smaller": 8.0, "faster_b32": 4.0, "faster_b1": 2.0}


def run_recipe() -> float:
    from compress import run

    started = time.perf_counter()
    run(str(RECIPE), output_dir=RUN_DIR, overwrite=True, show_progress=sys.stderr.isatty())
    return time.perf_counter() - started


def all_bytes(folder: Path) -> int:
    """Every file of the model folder except compress's own bookkeeping (stage.json, eval.json)."""
    skip = {"stage.json", "eval.json", "compress_bundle.json", "masks.safetensors"}
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name not in skip)


def time_pair(teacher: object, final: object, batch: int) -> dict:
    rounds = TIMING["rounds"][batch]
    t_s, f_s = interleaved_latency([teacher, final], batch, TIMING["seq_len"], TIMING["warmup"], rounds)
    ratios = [t / f for t, f in zip(t_s, f_s, strict=True)]
    return {"batch": batch, "rounds": rounds, "teacher_ms": round(1000 * statistics.median(t_s), 2),
            "final_ms": round(1000 * statistics.median(f_s), 2), "speedup": round(statistics.median(ratios), 3)}


def measure() -> dict:
    import torch

    from compress.bundle import ModelBundle
    from compress.report.schema import Report

    report = Report.model_validate_json((RUN_DIR / "report.json").read_text())
    teacher_point = next(p for p in report.points if p.name.startswith("01-"))  # stage 1 trains the teacher
    final_point = report.points[-1]
    teacher_dir, final_dir = RUN_DIR / teacher_point.name, RUN_DIR / final_point.name
    teacher, final = ModelBundle.load(teacher_dir).model, ModelBundle.load(final_dir).model
    speeds = [time_pair(teacher, final, b) for b in (32, 1)]
    t_acc, f_acc = teacher_point.accuracy.accuracy, final_point.accuracy.accuracy
    t_bytes, f_bytes = all_bytes(teacher_dir), all_bytes(final_dir)
    result = {
        "machine": machine_line(), "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
        "teacher": {"point": teacher_point.name, "accuracy": t_acc, "bytes": t_bytes,
                    "weights_bytes": teacher_point.size.disk_bytes, "parameters": teacher_point.size.parameters},
        "final": {"point": final_point.name, "accuracy": f_acc, "bytes": f_bytes,
                  "weights_bytes": final_point.size.disk_bytes, "parameters": final_point.size.parameters},
        "accuracy_kept": round(f_acc / t_acc, 4),
        "smaller": round(t_bytes / f_bytes, 2),
        "faster_b32": speeds[0]["speedup"], "faster_b1": speeds[1]["speedup"],
        "speed": speeds, "timing": {**TIMING, "rounds": {str(k): v for k, v in TIMING["rounds"].items()}},
        "points": [{"name": p.name, "accuracy": p.accuracy.accuracy if p.accuracy else None,
                    "disk_bytes": p.size.disk_bytes if p.size else None,
                    "parameters": p.size.parameters if p.size else None,
                    "stage_seconds": p.stage_seconds} for p in report.points],
    }
    return result


def write(result: dict, run_seconds: float | None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.html", "report.json"):
        shutil.copy2(RUN_DIR / name, OUT / name)
    if (RUN_DIR / "plots").exists():
        shutil.copytree(RUN_DIR / "plots", OUT / "plots", dirs_exist_ok=True)
    if run_seconds is not None:
        result["run_seconds"] = round(run_seconds, 1)
    elif (OUT / "showcase.json").exists():
        result["run_seconds"] = json.loads((OUT / "showcase.json").read_text()).get("run_seconds")
    (OUT / "showcase.json").write_text(json.dumps(result, indent=1))
    t, f = result["teacher"], result["final"]
    rows = [("accuracy kept vs teacher", f"{100 * result['accuracy_kept']:.1f}%", "≥ 97%",
             result["accuracy_kept"] >= TARGETS["accuracy_kept"]),
            ("smaller on disk (all files)", f"{result['smaller']:.2f}×", "≥ 8×", result["smaller"] >= TARGETS["smaller"]),
            ("faster at batch 32", f"{result['faster_b32']:.2f}×", "≥ 4×", result["faster_b32"] >= TARGETS["faster_b32"]),
            ("faster at batch 1", f"{result['faster_b1']:.2f}×", "≥ 2×", result["faster_b1"] >= TARGETS["faster_b1"])]
    lines = [
        "# Sentiment showcase: MiniLM teacher vs its compressed student, same run, same threads", "",
        f"Recipe: `recipes/sentiment-showcase.yaml` (`python -m bench.bench_showcase`). Machine: {result['machine']}; "
        f"1-minute load average before timing: {result['load_before']:.1f}."
        + (f" Whole run: {result['run_seconds'] / 60:.1f} min." if result.get("run_seconds") else ""), "",
        "| target | measured | goal | met |", "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {'yes' if d else '**no**'} |" for a, b, c, d in rows], "",
        "| model | eval point | accuracy | parameters | all files | weights |", "|---|---|---|---|---|---|",
        f"| teacher (6 layers, fp32) | {t['point']} | {100 * t['accuracy']:.2f}% | {t['parameters']:,} | "
        f"{t['bytes'] / 2**20:.2f} MiB | {t['weights_bytes'] / 2**20:.2f} MiB |",
        f"| final | {f['point']} | {100 * f['accuracy']:.2f}% | {f['parameters']:,} | "
        f"{f['bytes'] / 2**20:.2f} MiB | {f['weights_bytes'] / 2**20:.2f} MiB |", "",
        "| batch | teacher ms (median) | final ms (median) | speed-up (median of per-round ratios) | rounds |",
        "|---|---|---|---|---|",
        *[f"| {s['batch']} | {s['teacher_ms']:.1f} | {s['final_ms']:.1f} | {s['speedup']:.2f}× | {s['rounds']} |"
          for s in result["speed"]], "",
        f"Sequence length {TIMING['seq_len']} tokens for both batch sizes; {TIMING['warmup']} warm-up rounds; "
        f"torch threads {result['threads']}. Teacher and final model were loaded in one process and timed in "
        "turn within every round.", "",
        "Every stage of the chain (accuracy on the same 2,000 held-out tweets, weights on disk):", "",
        "| eval point | accuracy | parameters | weights on disk | stage time (s) |", "|---|---|---|---|---|",
        *[f"| {p['name']} | {100 * p['accuracy']:.2f}% | {p['parameters']:,} | {p['disk_bytes'] / 2**20:.2f} MiB | "
          f"{p['stage_seconds'] if p['stage_seconds'] is not None else '-'} |" for p in result["points"]], "",
        "The run's full report (with plots) is `report.md` / `report.html` next to this file.", "",
    ]
    missed = [r for r in rows if not r[3]]
    if missed:
        lines += ["**Missed:** " + "; ".join(f"{a}: {b} against {c}" for a, b, c, _ in missed) + ".", ""]
    (OUT / "showcase.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    seconds = None if "--time" in sys.argv else run_recipe()
    write(measure(), seconds)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
