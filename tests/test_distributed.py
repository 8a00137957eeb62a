"""The training loop and the finetune stage on 2 CPU processes (torchrun, gloo backend)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_processes_shard_data_and_end_with_identical_weights(tiny_bert_dir, sentiment_csv, tmp_path):
    worker = Path(__file__).with_name("_dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tiny_bert_dir), str(sentiment_csv), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 and r["loop_processes"] == 2 and r["stage_processes"] == 2 for r in ranks)
    # Each rank trained on its own shard: 4 steps x batch 8 each, no example on both.
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 32
    assert not seen0 & seen1
    # DDP averaged the gradients, so both ranks end with the same merged model and the same loss curve.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["loss_curve"] == ranks[1]["loss_curve"]
    curve = [loss for _, loss in ranks[0]["loss_curve"]]
    assert curve[-1] < curve[0]
