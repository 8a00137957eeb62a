"""`compress run` under `torchrun --nproc_per_node 2` (CPU, gloo): every rank trains, rank 0 alone
writes, and the result equals the single-process run's when the global batch is the same."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress import testing

pytestmark = pytest.mark.slow

# Global batch 8 either way: 8 on one process, 4 on each of two.
CHAIN = [
    {"type": "finetune", "method": "lora", "lr": 5e-3, "max_steps": 3, "dropout": 0.0},
    {"type": "finetune", "method": "full", "lr": 1e-4, "max_steps": 2},
    {"type": "finetune", "method": "qlora", "lr": 5e-3, "max_steps": 2, "dropout": 0.0},
    {"type": "distill", "teacher": "stage:1", "lr": 1e-4, "max_steps": 2},
    {"type": "prune", "sparsity": 0.5},
    {"type": "quantize", "scheme": "int8-dynamic"},
]


def _recipe(tmp_path, model_dir, text, name, batch):
    stages = [{**s, "batch_size": batch} if s["type"] in ("finetune", "distill") else s for s in CHAIN]
    recipe = testing.tiny_recipe(model_dir, text, "causal-lm", tmp_path / name, stages=stages, name=name,
                                 eval={"speed": False})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / name


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **extra}


def _torchrun(recipe_path, *extra, env=None):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "compress.cli", "run", str(recipe_path), "--quiet", *extra],
        env=env or _env(), capture_output=True, text=True, timeout=900)


def _single(recipe_path):
    return subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe_path), "--quiet"],
                          env=_env(), capture_output=True, text=True, timeout=900)


def _metrics(out):
    report = json.loads((out / "report.json").read_text())
    return [(p["name"], p["accuracy"]["perplexity"]) for p in report["points"]]


def test_two_processes_run_the_chain_once_and_match_one_process(tiny_llama_dir, lm_text, tmp_path):
    one_path, one_out = _recipe(tmp_path, tiny_llama_dir, lm_text, "one", batch=8)
    two_path, two_out = _recipe(tmp_path, tiny_llama_dir, lm_text, "two", batch=4)
    single = _single(one_path)
    assert single.returncode == 0, single.stderr[-3000:]
    dual = _torchrun(two_path)
    assert dual.returncode == 0, dual.stderr[-4000:]
    assert dual.stdout.count("done:") == 1  # one process reports
    run = json.loads((two_out / "run.json").read_text())
    assert run["status"] == "complete" and run["world_size"] == 2
    assert len(list(two_out.rglob("report.json"))) == 1
    from compress.bundle import ModelBundle

    for record in run["stages"]:
        folder = two_out / record["dir"]
        assert record["world_size"] == 2
        assert not [f for f in record["files"] if f.startswith(".")]  # no other rank's temporary file
        ModelBundle.load(folder)  # every stage folder reloads with all its weights (checked on load)
        assert any(f.endswith(".safetensors") for f in record["files"]), record["dir"]
    facts = json.loads((two_out / "01-finetune" / "stage.json").read_text())["facts"]
    assert facts["num_processes"] == 2
    one, two = _metrics(one_out), _metrics(two_out)
    assert [n for n, _ in one] == [n for n, _ in two]
    for (name, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=2e-3), name


def test_a_rank_killed_mid_run_then_resume_reproduces_the_uninterrupted_run(tiny_llama_dir, lm_text, tmp_path):
    path, out = _recipe(tmp_path, tiny_llama_dir, lm_text, "killed", batch=4)
    # Rank 0 SIGKILLs itself after saving the first stage's output, before its stage.json: torchrun then
    # stops the other rank, and the run cannot look complete.
    killed = _torchrun(path, env=_env(COMPRESS_FAULT="after_stage_save"))
    assert killed.returncode != 0
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert not (out / "01-finetune" / "stage.json").exists()
    resumed = _torchrun(path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    clean_path, clean_out = _recipe(tmp_path, tiny_llama_dir, lm_text, "clean", batch=4)
    clean = _torchrun(clean_path)
    assert clean.returncode == 0, clean.stderr[-4000:]
    resumed_points, clean_points = _metrics(out), _metrics(clean_out)
    assert [n for n, _ in resumed_points] == [n for n, _ in clean_points]
    for (name, a), (_, b) in zip(resumed_points, clean_points, strict=True):
        assert a == pytest.approx(b, rel=1e-6), name
