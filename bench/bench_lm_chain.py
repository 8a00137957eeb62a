"""Causal-LM chain: prune (Wanda) -> LoRA recovery with the masks kept -> nf4, perplexity at each step.

The LM is the tweets Llama from `bench.common.text_lm(LM_STEPS)` (trained here once and cached).
Two chains run through `compress.run`, one recipe each: Wanda 2:4 and Wanda 50% unstructured, each
followed by the same LoRA recovery (masked, merged) and bitsandbytes nf4 (which stores exact zeros,
so the sparsity survives). Writes reports/lm-chain.md, reports/lm-chain.json and, per chain, the
run's report (with plots) under reports/lm-chain/<chain>/.

    python -m bench.bench_lm_chain          # ~15 min on 2 cores once the LM is cached
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from bench.common import CACHE, LM_STEPS, REPORTS, lm_data, machine_line, text_lm

RECOVERY = {"type": "finetune", "method": "lora", "rank": 16, "alpha": 32, "lr": 1e-3, "max_steps": 150,
            "batch_size": 32, "warmup_ratio": 0.05, "scheduler": "cosine", "merge": "merge"}
CHAINS = {
    "wanda-2of4": {"type": "prune", "structure": "n:m", "pattern": "2:4", "method": "wanda"},
    "wanda-50": {"type": "prune", "structure": "unstructured", "sparsity": 0.5, "method": "wanda"},
}
NF4 = {"type": "quantize", "scheme": "nf4"}
DATA = lm_data(train=6000, eval_size=2000)


def run_chain(name: str, prune: dict) -> dict:
    from compress import run

    lm = text_lm(LM_STEPS)
    out = CACHE / f"bench-lm-chain-{name}"
    started = time.perf_counter()
    report = run({"name": f"lm-chain-{name}", "model": {"path": str(lm), "task": "causal-lm"},
                  "data": {**DATA, "calibration_samples": 128},
                  "eval": {"speed": False}, "output_dir": str(out),
                  "stages": [prune, RECOVERY, NF4]}, overwrite=True, show_progress=sys.stderr.isatty())
    dest = REPORTS / "lm-chain" / name
    dest.mkdir(parents=True, exist_ok=True)
    for file in ("report.md", "report.html", "report.json"):
        shutil.copy2(out / file, dest / file)
    if (out / "plots").exists():
        shutil.copytree(out / "plots", dest / "plots", dirs_exist_ok=True)
    steps = []
    for point in report.points:
        info = point.stage_info or {}
        steps.append({"point": point.name, "perplexity": point.accuracy.perplexity,
                      "sparsity": point.size.sparsity, "bits_per_weight": point.size.bits_per_weight,
                      "disk_bytes": point.size.disk_bytes, "stage_seconds": point.stage_seconds,
                      "pruned_zero_share_after": info.get("pruned_zero_share_after")})
    return {"chain": name, "prune": prune, "recovery": RECOVERY, "quantize": NF4, "steps": steps,
            "wall_seconds": round(time.perf_counter() - started, 1)}


def write(rows: list[dict]) -> None:
    lines = ["# Causal-LM chain: Wanda pruning -> LoRA recovery (masks kept) -> nf4", "",
             f"LM: the tweets Llama (4 layers, hidden 256, GQA 4:2, ~5M parameters) trained {LM_STEPS} steps "
             "(batch 32 × 64 tokens) on the tweets' text by `bench.common.text_lm`. Perplexity on "
             f"{DATA['eval_size']:,} held-out tweets packed into {DATA['max_length']}-token blocks. Wanda "
             "calibrates on 128 training blocks; recovery is LoRA r=16 on every linear layer, "
             f"{RECOVERY['max_steps']} steps of batch 32, lr {RECOVERY['lr']:g}, masked so pruned weights stay "
             "zero, merged; then bitsandbytes nf4 (run on the CPU), whose code book holds an exact 0.", "",
             f"Machine: {machine_line()}. Each chain is one `compress.run`; its full report with plots is in "
             "reports/lm-chain/<chain>/.", ""]
    for row in rows:
        dense = row["steps"][0]["perplexity"]
        lines += [f"## {row['chain']}", "", "| step | perplexity | vs dense | model sparsity | bits/weight | "
                  "weights on disk | stage s |", "|---|---|---|---|---|---|---|"]
        for step in row["steps"]:
            lines.append(f"| {step['point']} | {step['perplexity']:.2f} | {step['perplexity'] / dense:.3f}× | "
                         f"{100 * step['sparsity']:.1f}% | {step['bits_per_weight']:.2f} | "
                         f"{step['disk_bytes'] / 2**20:.2f} MiB | {step['stage_seconds'] or '-'} |")
        pruned, recovered = row["steps"][1]["perplexity"], row["steps"][2]["perplexity"]
        share = (pruned - recovered) / (pruned - dense) if pruned > dense else float("nan")
        lines += ["", f"LoRA recovery won back {100 * share:.0f}% of the perplexity the pruning cost; "
                  f"whole chain {row['wall_seconds'] / 60:.1f} min.", ""]
    lines += ["Model sparsity counts every parameter (embeddings and lm_head are never pruned). 2:4 and "
              "unstructured zeros are not faster with dense or bitsandbytes kernels on CPU: these rows "
              "show accuracy and size, not speed.", ""]
    (REPORTS / "lm-chain.md").write_text("\n".join(lines))
    (REPORTS / "lm-chain.json").write_text(json.dumps({"machine": machine_line(), "chains": rows}, indent=1))
    print("\n".join(lines))


def main(names: list[str]) -> None:
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        rows.append(run_chain(name, CHAINS[name]))
        write(rows)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CHAINS))
