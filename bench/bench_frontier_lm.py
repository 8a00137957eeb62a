"""The quantization and sparsity frontiers of issue #19 on the tweets Llama (`bench.common.text_lm(LM_STEPS)`:
4 layers, hidden 256, ~5M parameters, trained here on tweets' text for 1,000 steps, the LM bench_prune and
bench_distill use), at groups of 128 weights, which its widths (256, 768) allow and SmolLM2's (576) do not.

The same variants as `bench.bench_frontier` (RTN / GPTQ / act-order / static groups / AWQ at 4 and 3
bits, true-sequential at 3, mixed precision at 4.5 and 3.5 average bits) and as
`bench.bench_sparsity_frontier` (Wanda / SparseGPT, uniform and OWL, at 50, 60, 70% and 2:4), each one
`compress run`; perplexity on the 2,000 held-out tweets the LM was not trained on (`bench_prune`'s LM
split), 128 calibration blocks of 64 tokens. Writes reports/frontier-tweets-lm.json and .md after
every variant.

    python -m bench.bench_frontier_lm            # every variant (trains the LM first if not cached)
    python -m bench.bench_frontier_lm render     # rewrite the .md from the .json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from bench.bench_frontier import variants as quant_variants
from bench.bench_prune import run_variants
from bench.bench_sparsity_frontier import OWL
from bench.bench_sparsity_frontier import VARIANTS as SPARSITY_VARIANTS
from bench.common import LM_STEPS, REPORTS, lm_data, machine_line, text_lm

GROUP = 128
JSON, MD = REPORTS / "frontier-tweets-lm.json", REPORTS / "frontier-tweets-lm.md"


def variants() -> dict[str, list[dict[str, Any]]]:
    sparsity = {k: v for k, v in SPARSITY_VARIANTS.items() if "-seq" not in k and k != "dense"}
    return {**quant_variants(group=GROUP), **sparsity}


def main() -> None:
    result = json.loads(JSON.read_text()) if JSON.exists() else {"rows": []}
    model, data, chosen = text_lm(LM_STEPS), lm_data(train=3000, eval_size=2000), variants()
    for label, stages in chosen.items():
        new = run_variants("tweets-lm-frontier", model, "causal-lm", data, {label: stages})
        rows = {r["variant"]: r for r in result["rows"]} | {r["variant"]: r for r in new}
        result.update(machine=machine_line(), load_average=[round(x, 1) for x in os.getloadavg()], model=str(model),
                      rows=[rows[k] for k in chosen if k in rows])
        REPORTS.mkdir(exist_ok=True)
        JSON.write_text(json.dumps(result, indent=1))
        MD.write_text(render(result))
    print(MD.read_text())


def render(result: dict[str, Any]) -> str:
    rows = {r["variant"]: r for r in result["rows"]}
    dense = rows.get("dense", {}).get("perplexity")
    lines = [f"# Frontier on the tweets Llama (4 layers, hidden 256, ~5M parameters, {LM_STEPS} training steps)", "",
             (f"`python -m bench.bench_frontier_lm`. Machine: {result['machine']}; load average when written "
             f"{result.get('load_average')}. Each row one `compress run`; perplexity on the 2,000 held-out tweets "
             f"the LM was not trained on (64-token blocks); 128 calibration blocks of 64 tokens; quantization "
             f"in groups of {GROUP}. OWL: {OWL}, tuned on SmolLM2 (`bench_sparsity_frontier sweep`), not here."),
             "", "| variant | perplexity | vs dense | stage s |", "|---|---:|---:|---:|"]
    for label in variants():
        r = rows.get(label)
        if r is None:
            continue
        rel = f"{100 * (r['perplexity'] / dense - 1):+.1f}%" if dense and label != "dense" else ""
        lines.append(f"| {label} | {r['perplexity']:.3f} | {rel} | {r['stage_seconds'] or '–'} |")
    missing = [k for k in variants() if k not in rows]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    lines += [line for note in result.get("notes", []) for line in ("", f"- {note}")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["render"]:
        MD.write_text(render(json.loads(JSON.read_text())))
    else:
        main()
