"""recipes/sentiment-showcase.yaml runs end to end offline, with a tiny 6-layer BERT and tiny data
substituted through the same key=value overrides a user passes to `compress run`."""

from __future__ import annotations

from pathlib import Path

import torch

from compress import ModelBundle, run
from compress.quant.dynamic import DynamicInt8Linear
from compress.testing import make_tiny_bert, write_sentiment_csv

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sentiment-showcase.yaml"


def test_sentiment_showcase_chain_runs_with_a_tiny_model(tmp_path):
    model = make_tiny_bert(tmp_path / "m", num_hidden_layers=6, vocab_size=500)
    csv = write_sentiment_csv(tmp_path / "d.csv", n=160)
    overrides = [f"model.path={model}", f"data.source={csv}", "data.encoding=utf-8", "data.label_column=label",
                 "data.eval_size=40", "data.max_train_samples=null", "data.max_length=32",
                 "data.calibration_samples=16", "eval.speed=false", f"output_dir={tmp_path / 'run'}",
                 "stages[0].max_train_samples=null"]
    overrides += [f"stages[{i}].max_steps=3" for i in (0, 1, 3)]
    report = run(str(RECIPE), overrides, show_progress=False)
    names = [p.name for p in report.points]
    assert names == ["baseline", "01-finetune", "02-distill", "03-prune", "04-distill", "05-trim-vocab",
                     "06-quantize"]
    final = ModelBundle.load(tmp_path / "run" / "06-quantize").model
    assert final.config.num_hidden_layers == 2
    assert final.config.intermediate_size == 64  # half of the tiny model's 128 FFN channels
    assert final.config.vocab_size < 500
    linears = [m for n, m in final.named_modules() if isinstance(m, DynamicInt8Linear)]
    assert linears and not any(isinstance(m, torch.nn.Linear) and "classifier" not in n
                               for n, m in final.named_modules())
    sizes = {p.name: p.size.disk_bytes for p in report.points}
    assert sizes["06-quantize"] < sizes["05-trim-vocab"] < sizes["04-distill"] < sizes["01-finetune"]
    assert report.points[4].stage_info["teacher"].startswith("stage:1")
