"""The real-LLM recipes (recipes/qlora-llm.yaml, wanda-24-lora-nf4.yaml, distill-llm-sibling.yaml),
run end to end offline: tiny local Llamas stand in for the Hub models and a small grammar text for
the Hub data set, through the same `key=value` overrides a user passes to `compress run`.

Everything else (stage settings, merge policies, calibration, dtypes) is the shipped recipe's.
"""

from pathlib import Path

import pytest
import torch

from compress import ModelBundle, run
from compress.training import adapters

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_overrides(model_dir, text, out, steps_at: list[int], steps: int = 4) -> list[str]:
    """What a user would type to point a Hub recipe at local files and make it quick."""
    return [
        f"model.path={model_dir}",
        f"data.source={text}",
        "data.eval_split=null",              # a local text file has one split: cut eval_size from it
        "data.eval_size=0.2",
        "data.max_length=32",
        "data.calibration_samples=16",
        "eval.lm_eval=null",                 # the harness tasks need their Hub data sets
        "eval.speed=false",
        "eval.eval_batch_size=16",
        f"output_dir={out}",
        *[f"stages[{i}].max_steps={steps}" for i in steps_at],
        *[f"stages[{i}].batch_size=8" for i in steps_at],
        *[f"stages[{i}].grad_accum=1" for i in steps_at],
        *[f"stages[{i}].eval_every=2" for i in steps_at],
        *[f"stages[{i}].checkpoint_every=2" for i in steps_at],
    ]


def _dequantized(layer) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def test_qlora_llm_recipe_trains_a_4bit_model_and_reports_its_curve(tiny_llama_dir, lm_text, tmp_path):
    out = tmp_path / "run"
    report = run(RECIPES / "qlora-llm.yaml", _tiny_overrides(tiny_llama_dir, lm_text, out, [0]),
                 show_progress=False)
    assert report.status == "complete"
    assert [p.name for p in report.points] == ["baseline", "01-finetune"]
    info = report.final.stage_info
    # The recipe's choices survive the overrides: QLoRA, merged into a still-4-bit base.
    assert info["method"] == "qlora" and info["merge"] == "dequantize-merge-requantize"
    assert info["quantized_layers"] == info["quantized_layers_after_merge"] == 14  # lm_head stays float
    assert [step for step, _ in info["loss_curve"]] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in info["loss_curve"])
    assert [step for step, _ in info["eval_curve"]] == [2, 4]
    for point in report.points:
        assert point.accuracy.perplexity is not None and 1 < point.accuracy.perplexity < float("inf")
    # The base loads straight into NF4 and the baseline is measured on it (it says so); both it and
    # the merged, still-4-bit model are much smaller on disk than the fp32 weights would be.
    assert any("NF4" in note for note in report.baseline.notes)
    fp32_bytes = 4 * report.baseline.size.parameters
    assert report.baseline.size.disk_bytes < 0.6 * fp32_bytes and report.final.size.disk_bytes < 0.6 * fp32_bytes
    assert (out / "adapters" / "01-finetune" / "adapter_model.safetensors").exists()  # save_adapter
    reloaded = ModelBundle.load(out / "01-finetune")
    assert adapters.count_bnb(reloaded.model) == {"Linear4bit": 14}
    assert (out / "report.md").exists()


def test_wanda_24_lora_nf4_recipe_keeps_2_4_zeros_through_lora_and_nf4(tiny_llama_dir, lm_text, tmp_path):
    out = tmp_path / "run"
    report = run(RECIPES / "wanda-24-lora-nf4.yaml", _tiny_overrides(tiny_llama_dir, lm_text, out, [1]),
                 show_progress=False)
    assert report.status == "complete"
    assert [p.name for p in report.points] == ["baseline", "01-prune", "02-finetune", "03-quantize"]
    assert [p.stage_type for p in report.points[1:]] == ["prune", "finetune", "quantize"]
    prune, recover, quant = (p.stage_info for p in report.points[1:])
    assert prune["method"] == "wanda" and prune["pattern"] == "2:4" and prune["calibration_samples"] == 16
    assert prune["layers_pruned"] == 14 and prune["measured_sparsity_pruned_layers"] == 0.5
    assert recover["masked_lora_layers"] == 14 and recover["merge"] == "merge"
    assert recover["pruned_zero_share_before"] == recover["pruned_zero_share_after"] == 1.0
    assert quant["scheme"] == "nf4"
    # Recovery helps: lower perplexity than right after pruning.
    assert report.points[2].accuracy.perplexity < report.points[1].accuracy.perplexity

    model = ModelBundle.load(out / "03-quantize").model
    assert adapters.count_bnb(model) == {"Linear4bit": 14}
    checked = 0
    for name, layer in model.named_modules():
        if type(layer).__name__ != "Linear4bit":
            continue
        weight = _dequantized(layer)
        groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all()), f"{name} lost its 2:4 pattern"
        checked += 1
    assert checked == 14
    layers = {layer.name: layer for layer in report.final.size.layers}
    # 4 bits + block scales; on an 8k-weight layer the fixed per-layer state (NF4 code table,
    # double-quant constants) adds ~1 bit that a real 0.5B layer spreads to nothing.
    assert 4 < layers["model.layers.0.mlp.down_proj"].bits_per_weight < 6
    baseline_layers = {layer.name: layer for layer in report.baseline.size.layers}
    assert baseline_layers["model.layers.0.mlp.down_proj"].bits_per_weight == 32
    assert type(model.lm_head) is torch.nn.Linear  # the head stays float (quantize_head: false)


def test_distill_llm_sibling_recipe_teaches_the_smaller_sibling(tiny_llama_dir, lm_text, tmp_path):
    from compress.testing import make_tiny_llama

    # The "larger sibling": same tokenizer, twice the depth and width.
    teacher = make_tiny_llama(tmp_path / "teacher", seed=1, num_hidden_layers=4, hidden_size=128,
                              intermediate_size=256)
    out = tmp_path / "run"
    overrides = _tiny_overrides(tiny_llama_dir, lm_text, out, [0]) + [f"stages[0].teacher={teacher}"]
    report = run(RECIPES / "distill-llm-sibling.yaml", overrides, show_progress=False)
    assert report.status == "complete"
    assert [p.name for p in report.points] == ["baseline", "01-distill"]
    info = report.final.stage_info
    assert info["teacher"] == str(teacher) and info["student"] == "incoming model"
    assert info["teacher_layers"] == 4 and info["student_layers"] == 2
    assert info["student_parameters"] < info["teacher_parameters"]
    assert info["parameter_ratio"] == round(info["student_parameters"] / info["teacher_parameters"], 4) < 0.5
    assert 0 <= info["agreement_with_teacher"] <= 1
    assert [step for step, _ in info["loss_curve"]] == [1, 2, 3, 4]
    # The student is what the run saves: the recipe's 2-layer model, not the teacher.
    student = ModelBundle.load(out / "01-distill").model
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 64
    assert report.final.size.parameters == report.baseline.size.parameters == info["student_parameters"]
