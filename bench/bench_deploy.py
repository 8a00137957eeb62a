"""Deploy: the quickstart's MiniLM student served by ONNX Runtime against compress's own int8 model.

From a finished run of `recipes/quickstart.yaml` (fine-tune -> distill to 3 layers -> int8-dynamic),
the float student (the distill stage's output) is exported with `compress export --format onnx`,
fp32 and int8 (dynamic, per-channel), and checked in ONNX Runtime on the run's own held-out tweets.
Then, in one process, accuracy on the same rows and latency at batch 1 and 32 (sequence 64), timed
in interleaved rounds, of: PyTorch fp32 (the student), compress int8-dynamic (the run's final
model), ONNX Runtime fp32 and ONNX Runtime int8.

    python -m bench.bench_deploy                       # runs the quickstart recipe first (~5 min)
    python -m bench.bench_deploy --run runs/quickstart # or uses a finished quickstart run (copied)

Writes reports/deploy.md and reports/deploy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import CACHE, REPORTS, ROOT, kept_sections, machine_line

B1_REPEATS, B32_REPEATS, SEQ = 40, 12, 64


def _prepare_run(source: str | None) -> Path:
    """A private copy of a finished quickstart run (exports are written into the run folder)."""
    target = CACHE / "deploy-quickstart"
    if source is None:
        from compress import run

        if not (target / "03-quantize" / "stage.json").exists():
            run(str(ROOT / "recipes" / "quickstart.yaml"), output_dir=target, overwrite=True, show_progress=False)
        return target
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("exports", "publish"))
    return target


def _stages(run_dir: Path) -> tuple[str, str]:
    manifest = json.loads((run_dir / "run.json").read_text())
    dirs = {s["type"]: s["dir"] for s in manifest["stages"]}
    return dirs["distill"], dirs["quantize"]


def main() -> None:
    import onnxruntime
    import torch

    from compress.bundle import ModelBundle
    from compress.data import load_data
    from compress.export.from_run import export_finished_run
    from compress.export.measure import accuracy, heldout_batches
    from compress.export.onnx import ort_logits, session, timing_inputs, torch_logits
    from compress.recipe import DataSpec

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", help="a finished run of recipes/quickstart.yaml (copied, not changed)")
    parser.add_argument("--threads", type=int, help="threads for PyTorch and ONNX Runtime alike (default: torch's)")
    parser.add_argument("--reuse", action="store_true", help="keep the exports of an earlier bench run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = CACHE / "deploy-quickstart" if args.reuse else _prepare_run(args.run)
    float_dir, int8_dir = _stages(run_dir)
    recorded = json.loads((run_dir / "run.json").read_text())["recipe"]
    eval_rows = int(recorded["data"]["eval_size"])

    exports: dict[str, dict[str, Any]] = {}
    for name, quantize in (("onnx-fp32", "none"), ("onnx-int8", "int8")):
        if args.reuse:
            exports[name] = json.loads((run_dir / "exports" / name / "export.json").read_text())
            continue
        started = time.perf_counter()
        facts = export_finished_run(run_dir, "onnx", stage=float_dir,
                                    settings={"name": name, "quantize": quantize, "eval_samples": eval_rows,
                                              "repeats": 3})
        facts["export_seconds"] = round(time.perf_counter() - started, 1)
        exports[name] = facts

    student = ModelBundle.load(run_dir / float_dir)
    int8 = ModelBundle.load(run_dir / int8_dir)
    data = load_data(DataSpec.model_validate(recorded["data"]), "sequence-classification", int(recorded["seed"]))
    batches = heldout_batches(data, student.tokenizer, eval_rows)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batches[0]]
    labels = torch.cat([b["labels"] for b in batches])
    sessions = {name: session(run_dir / "exports" / name / "model.onnx", args.threads) for name in exports}
    inputs = [{n: b[n] for n in names} for b in batches]
    logits = {"PyTorch fp32 (student)": torch_logits(student.model.eval(), inputs, names),
              "compress int8-dynamic": torch_logits(int8.model.eval(), inputs, names),
              "ONNX Runtime fp32": ort_logits(sessions["onnx-fp32"], inputs),
              "ONNX Runtime int8": ort_logits(sessions["onnx-int8"], inputs)}

    vocab = int(student.model.config.vocab_size)
    latency: dict[str, dict[str, float]] = {name: {} for name in logits}
    spread: dict[str, dict[str, float]] = {name: {} for name in logits}
    for batch, repeats in ((1, B1_REPEATS), (32, B32_REPEATS)):
        feed = timing_inputs(inputs[0], batch, SEQ, vocab)
        arrays = {n: t.numpy() for n, t in feed.items()}
        fns = {"PyTorch fp32 (student)": lambda f=feed: student.model(**f),
               "compress int8-dynamic": lambda f=feed: int8.model(**f),
               "ONNX Runtime fp32": lambda a=arrays: sessions["onnx-fp32"].run(None, a),
               "ONNX Runtime int8": lambda a=arrays: sessions["onnx-int8"].run(None, a)}
        times: dict[str, list[float]] = {name: [] for name in fns}
        with torch.inference_mode():
            for round_ in range(2 + repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    if round_ >= 2:
                        times[name].append(1000 * (time.perf_counter() - start))
        for name, values in times.items():
            q = statistics.quantiles(values, n=4)
            latency[name][f"b{batch}"] = round(statistics.median(values), 2)
            spread[name][f"b{batch}"] = round(q[2] - q[0], 2)

    sizes = {"PyTorch fp32 (student)": (run_dir / float_dir / "model.safetensors").stat().st_size,
             "compress int8-dynamic": (run_dir / int8_dir / "model.safetensors").stat().st_size,
             "ONNX Runtime fp32": exports["onnx-fp32"]["file_bytes"],
             "ONNX Runtime int8": exports["onnx-int8"]["file_bytes"]}
    rows = []
    for name, values in logits.items():
        rows.append({"model": name, "accuracy": round(100 * accuracy(values, labels), 2),
                     "agreement_with_fp32": round(100 * float((values.argmax(-1) == logits[
                         "PyTorch fp32 (student)"].argmax(-1)).float().mean()), 2),
                     "mib": round(sizes[name] / 2**20, 1), **{f"{k}_ms": v for k, v in latency[name].items()},
                     **{f"{k}_iqr_ms": v for k, v in spread[name].items()}})
    command = " ".join(["python -m bench.bench_deploy", *(["--run", args.run] if args.run else []),
                        *(["--threads", str(args.threads)] if args.threads else []), *(["--reuse"] if args.reuse else [])])
    result = {"command": command,
              "machine": machine_line(), "load_average": [round(x, 2) for x in os.getloadavg()],
              "onnxruntime": onnxruntime.__version__, "held_out_rows": len(labels), "seq_len": SEQ,
              "repeats": {"b1": B1_REPEATS, "b32": B32_REPEATS}, "rows": rows, "exports": exports}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "deploy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    # bench_gguf and bench_onnx_lm write their own marked sections into deploy.md: keep them.
    from bench import bench_gguf, bench_onnx_lm

    others = kept_sections(REPORTS / "deploy.md", [(bench_gguf.START, bench_gguf.END),
                                                   (bench_onnx_lm.START, bench_onnx_lm.END)])
    (REPORTS / "deploy.md").write_text(render(result).rstrip("\n") + "\n" + others)
    print((REPORTS / "deploy.md").read_text())


def render(result: dict[str, Any]) -> str:
    int8, f32 = (next(r for r in result["rows"] if r["model"] == n)
                 for n in ("ONNX Runtime int8", "compress int8-dynamic"))
    lines = [
        "# Deploy: the quickstart student in ONNX Runtime vs compress int8-dynamic",
        "",
        (f"Command: `{result['command']}`. Machine: {result['machine']}; load average at the end "
        f"{result['load_average']} (a shared machine: other jobs ran on the same 2 cores, so read the ratios, "
        f"which interleaved timing keeps fair, more than the absolute times). ONNX Runtime "
        f"{result['onnxruntime']}."),
        "",
        (f"Accuracy on the run's {result['held_out_rows']} held-out tweets; latency: median of "
        f"{result['repeats']['b1']} (batch 1) / {result['repeats']['b32']} (batch 32) interleaved rounds at sequence "
        f"{result['seq_len']}, spread = interquartile range."),
        "",
        "| model | accuracy % | top-1 agreement with fp32 % | file MiB | batch 1 ms (IQR) | batch 32 ms (IQR) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['accuracy']:.2f} | {r['agreement_with_fp32']:.2f} | {r['mib']} | "
                     f"{r['b1_ms']} ({r['b1_iqr_ms']}) | {r['b32_ms']} ({r['b32_iqr_ms']}) |")
    lines += [
        "",
        (f"ONNX Runtime int8 against compress int8-dynamic: {f32['b1_ms'] / int8['b1_ms']:.2f}x as fast at batch 1, "
        f"{f32['b32_ms'] / int8['b32_ms']:.2f}x at batch 32; accuracy {int8['accuracy'] - f32['accuracy']:+.2f} pt."),
        "",
        "How the exports were made (the export stage's own facts, `exports/*/export.json`):",
        "",
    ]
    for name, facts in result["exports"].items():
        lines.append(f"- `{name}`: graph fusions {facts['fused_ops']}; fp32 graph vs PyTorch "
                     f"{facts['fp32_graph_max_rel_logit_diff']:.2g} of the largest logit; in-runtime accuracy "
                     f"{100 * facts['accuracy_runtime']:.2f}% vs PyTorch {100 * facts['accuracy_pytorch']:.2f}%"
                     + (f"; export + checks {facts['export_seconds']} s." if "export_seconds" in facts else "."))
    if result.get("note"):
        lines += ["", result["note"]]
    earlier = result.get("two_thread_run")
    if earlier:
        lines += ["", (f"An earlier run with 2 threads each (`{earlier['command']}`, load average {earlier['load_average']}) "
                  "is kept for the record but not used: with ~15 runnable jobs on 2 cores, PyTorch's batch-1 spread "
                  "exceeded its median (2-thread intra-op parallelism stalls when its threads are descheduled), so "
                  "its ratios measure the contention, not the runtimes:"), "",
                  "| model | batch 1 ms (IQR) | batch 32 ms (IQR) |", "|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['b1_ms']} ({r['b1_iqr_ms']}) | {r['b32_ms']} ({r['b32_iqr_ms']}) |"
                  for r in earlier["rows"]]
    for batch in ("b1", "b32"):
        gap = f32[f"{batch}_ms"] - int8[f"{batch}_ms"]
        lines += ["", (f"Batch {batch[1:]}: the medians are {gap:+.2f} ms apart (compress int8-dynamic minus ONNX Runtime "
                       f"int8), against interquartile ranges of {f32[f'{batch}_iqr_ms']} and {int8[f'{batch}_iqr_ms']} "
                       f"ms" + (": the gap is larger than either spread." if abs(gap) > max(
                           f32[f"{batch}_iqr_ms"], int8[f"{batch}_iqr_ms"]) else ": within the noise."))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
