"""`compress plan`: counts against the libraries that allocate the memory, and the QLoRA paper's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main
from compress.errors import RecipeError
from compress.plan import plan_recipe
from compress.plan.command import parse_size
from compress.plan.memory import bnb4_bytes, saved_activations
from compress.plan.shapes import model_shape
from compress.recipe import load_recipe

QLORA_7B = "recipes/plan/llama-2-7b-qlora.yaml"
CONFIGS = "pkg:compress/configs/"
GIB = 2**30

# QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), Figure 6: total memory of QLoRA fine-tuning
# LLaMA at batch size 1, sequence length 512, gradient checkpointing, rank-64 LoRA on every linear layer.
PAPER_TOTAL_GB = {"llama-2-7b": 6.9, "llama-65b": 45.0}


def _qlora(size: str, **overrides):
    recipe = load_recipe(QLORA_7B, [f"model.path={CONFIGS}{size}", *[f"{k}={v}" for k, v in overrides.items()]])
    return plan_recipe(recipe, device="cuda", check_devices=False)


def _as_method(method: str, size: str = "llama-2-7b", **stage_extra):
    """The QLoRA recipe with another finetune method: the method's config refuses other methods'
    fields (rank, compute_dtype, ...), so those the new method lacks are dropped."""
    from compress.stages.finetune import FINETUNE_METHODS

    data = yaml.safe_load(Path(QLORA_7B).read_text())
    data["model"]["path"] = f"{CONFIGS}{size}"
    fields = FINETUNE_METHODS.get(method).config_cls.model_fields
    stage = {k: v for k, v in data["stages"][0].items() if k in fields}
    data["stages"][0] = {**stage, "method": method, **stage_extra}
    return load_recipe(data)


def test_parameter_counts_match_the_published_models():
    from transformers import AutoConfig

    from compress.paths import resolve_path

    published = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
                 "llama-65b": 65_285_660_672}
    for name, count in published.items():
        config = AutoConfig.from_pretrained(resolve_path(CONFIGS + name))
        assert model_shape(config, "causal-lm").total == count, name


@pytest.mark.parametrize("size", sorted(PAPER_TOTAL_GB))
def test_qlora_plan_within_15_percent_of_the_paper(size):
    plan = _qlora(size)
    estimate = plan.peak / GIB  # the paper's GB are GPU gigabytes (a "48GB" GPU holds 48 GiB)
    assert abs(estimate / PAPER_TOTAL_GB[size] - 1) < 0.15, (size, estimate)


def test_65b_qlora_fits_48gb_and_lora_bf16_does_not():
    assert _qlora("llama-65b").peak < 48 * GIB  # the paper's headline
    lora = plan_recipe(_as_method("lora", "llama-65b"), device="cuda", check_devices=False)
    assert lora.peak > 120 * GIB  # bf16 base alone: 121.6 GiB


def test_nf4_bytes_equal_bitsandbytes_allocation():
    bnb = pytest.importorskip("bitsandbytes")
    for double_quant in (True, False):
        weight = bnb.nn.Params4bit(torch.randn(384, 1024), requires_grad=False, quant_type="nf4",
                                   compress_statistics=double_quant)._quantize("cpu")
        state = weight.quant_state
        tensors = [weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        allocated = sum(t.numel() * t.element_size() for t in tensors)
        assert bnb4_bytes(384 * 1024, double_quant) == allocated


def test_lora_trainable_parameters_equal_peft(tiny_llama_dir, lm_recipe):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from compress.training.adapters import linear_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for method, dora in (("lora", False), ("dora", True)):
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                    LoraConfig(r=4, target_modules=sorted(linear_layers(model)), use_dora=dora))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        lm_recipe["stages"] = [{"type": "finetune", "method": method, "rank": 4}]
        plan = plan_recipe(load_recipe(lm_recipe), device="cpu", check_devices=False)
        row = next(r for r in plan.stages if r.label.startswith("1 finetune"))
        assert row.parts["adapters"] == trainable * 4  # fp32 adapters
        assert row.parts["optimizer"] == trainable * 8  # AdamW: two fp32 states


def test_classifier_head_is_trained_in_full_as_peft_does(tiny_bert_dir, cls_recipe):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from compress.training.adapters import linear_layers

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=sorted(linear_layers(model)),
                                                  task_type=TaskType.SEQ_CLS))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    cls_recipe["stages"] = [{"type": "finetune", "rank": 4}]
    row = plan_recipe(load_recipe(cls_recipe), device="cpu", check_devices=False).stages[1]
    assert row.parts["adapters"] == trainable * 4


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(config), "causal-lm"


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_labels=3)  # dropout 0.1 on outputs and attention
    return BertForSequenceClassification(config), "sequence-classification"


@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_activations_match_autograd(build, dtype, checkpointing):
    """The tensors autograd really keeps for backward, counted with saved_tensors_hooks."""
    torch.manual_seed(0)
    model, task = build()
    model = model.to(dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (2, 64))
    labels = ids if task == "causal-lm" else torch.zeros(2, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels)
    measured = sum(n for ptr, n in seen.items() if ptr not in params)
    estimate = saved_activations(model_shape(model.config, task), 2, 64, dtype.itemsize, checkpointing)
    assert abs(estimate / measured - 1) < 0.15, (estimate, measured)


def test_zero3_shards_weights_gradients_and_optimizer():
    recipe = _as_method("full")
    single = plan_recipe(recipe, device="cuda", check_devices=False).stages[0].parts
    sharded = plan_recipe(recipe, device="cuda", world_size=8, shard="zero3", check_devices=False).stages[0].parts
    for part in ("weights", "gradients"):
        assert sharded[part] == -(-single[part] // 8)
    # DeepSpeed keeps fp32 master weights and fp32 Adam states for a bf16 model: 12 bytes/param over 8.
    assert sharded["fp32 master weights"] + sharded["optimizer"] == pytest.approx(6_738_415_616 * 12 / 8, rel=1e-6)
    zero2 = plan_recipe(recipe, device="cuda", world_size=8, shard="zero2", check_devices=False).stages[0].parts
    assert zero2["weights"] == single["weights"] and zero2["gradients"] == sharded["gradients"]


def test_stage_deepspeed_setting_counts_as_zero3():
    recipe = _as_method("full", deepspeed={"zero_optimization": {"stage": 3}})
    plan = plan_recipe(recipe, device="cuda", world_size=4, check_devices=False)
    assert plan.stages[0].parts["weights"] == -(-6_738_415_616 * 2 // 4)


def test_the_recipe_distributed_section_plans_like_the_stage_setting():
    from compress.recipe import load_recipe as load

    data = _as_method("full").to_dict(explicit_only=True)
    data["distributed"] = {"fsdp": {"fsdp_version": 2}}
    plan = plan_recipe(load(data), device="cuda", world_size=4, check_devices=False)
    assert plan.stages[0].parts["weights"] == -(-6_738_415_616 * 2 // 4)


def test_chain_tracks_masks_quantization_and_gptq_hessians(lm_recipe):
    lm_recipe["stages"] = [{"type": "prune", "method": "wanda", "sparsity": 0.5},
                           {"type": "quantize", "scheme": "gptq"},
                           {"type": "finetune", "method": "lora"}]
    plan = plan_recipe(load_recipe(lm_recipe), device="cpu", check_devices=False)
    labels = [r.label for r in plan.stages]
    assert labels == ["evaluate baseline", "1 prune", "2 quantize (gptq)", "3 finetune (lora)", "evaluate final"]
    prune, gptq, lora = plan.stages[1], plan.stages[2], plan.stages[3]
    linears = model_shape_of(lm_recipe).linears
    assert prune.parts["masks"] == sum(i * o for i, o in linears.values())
    assert gptq.parts["hessians (float64)"] == sum(i * i * 8 for i, _ in linears.values())
    assert lora.parts["weights"] < prune.parts["weights"]  # 4-bit linears after gptq


@pytest.mark.parametrize(("stage", "part"), [
    ({"type": "prune", "structure": "ffn", "sparsity": 0.25, "importance": "taylor"}, "gradients"),
    ({"type": "prune", "structure": "layers", "count": 1}, "calibration forward"),
    ({"type": "prune", "structure": "n:m", "method": "wanda", "targets": [r"mlp\..*"]}, "masks"),
])
def test_every_prune_structure_plans_with_its_own_fields(lm_recipe, stage, part):
    lm_recipe["stages"] = [stage]
    plan = plan_recipe(load_recipe(lm_recipe), device="cpu", check_devices=False)
    assert plan.stages[1].parts[part] > 0
    if part == "masks":  # only the targeted MLP layers are masked
        mlp = sum(i * o for n, (i, o) in model_shape_of(lm_recipe).linears.items() if ".mlp." in n)
        assert plan.stages[1].parts["masks"] == mlp


def model_shape_of(recipe_dict):
    from compress.loading import load_config

    return model_shape(load_config(load_recipe(recipe_dict).model), "causal-lm")


def test_distill_counts_teacher_and_student(lm_recipe):
    lm_recipe["stages"] = [{"type": "distill", "keep_layers": [1]}]
    plan = plan_recipe(load_recipe(lm_recipe), device="cpu", check_devices=False)
    row = plan.stages[1]
    assert row.parts["teacher weights"] == plan.params * 4
    assert row.parts["student weights"] < row.parts["teacher weights"]
    assert "student gradients" in row.parts and "student optimizer" in row.parts


def test_quantize_include_picks_only_those_layers(lm_recipe):
    from compress.plan.memory import linear_bytes

    lm_recipe["stages"] = [{"type": "quantize", "scheme": "int8-weight", "include": ["q_proj"]}]
    plan = plan_recipe(load_recipe(lm_recipe), device="cpu", check_devices=False)
    linears = model_shape_of(lm_recipe).linears
    saved = sum(i * o * 4 - linear_bytes("int8-weight", i, o, 4, None)
                for n, (i, o) in linears.items() if n.endswith("q_proj"))
    assert saved > 0
    assert plan.stages[0].parts["weights"] - plan.stages[-1].parts["weights"] == saved


def test_distill_from_a_named_teacher_trains_the_incoming_model(lm_recipe, tiny_llama_dir):
    lm_recipe["stages"] = [{"type": "distill", "teacher": str(tiny_llama_dir)}]
    row = plan_recipe(load_recipe(lm_recipe), device="cpu", check_devices=False).stages[1]
    assert row.parts["teacher weights"] == row.parts["student weights"]  # the same tiny Llama twice


def test_bad_sharding_flags_are_named():
    recipe = load_recipe(QLORA_7B)
    with pytest.raises(RecipeError, match="--world-size: 0 must be 1 or more"):
        plan_recipe(recipe, world_size=0, check_devices=False)
    with pytest.raises(RecipeError, match="--shard: 'zero9'"):
        plan_recipe(recipe, world_size=2, shard="zero9", check_devices=False)


def test_shard_without_world_size_names_the_flag():
    with pytest.raises(RecipeError, match="--world-size"):
        plan_recipe(load_recipe(QLORA_7B), shard="zero3", check_devices=False)


def test_cli_plan_fit_and_exit_codes(tmp_path, capsys):
    assert main(["plan", QLORA_7B, "--set", f"model.path={CONFIGS}llama-65b", "--device-memory", "48GiB"]) == 0
    out = capsys.readouterr().out
    assert "1 finetune (qlora)" in out and "fits" in out and "accelerate estimate-memory" in out
    assert main(["plan", QLORA_7B, "--device-memory", "4GiB"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_plan_bad_recipe_exits_2_naming_the_field(tmp_path, capsys):
    data = yaml.safe_load(Path(QLORA_7B).read_text())
    data["stages"][0]["rnak"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path)]) == 2
    assert "stages[0].rnak: unknown key; did you mean 'rank'?" in capsys.readouterr().err
    assert main(["plan", QLORA_7B, "--device-memory", "lots"]) == 2
    assert "--device-memory: 'lots' is not a size" in capsys.readouterr().err


def test_config_that_transformers_cannot_build_names_model_path(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "nonexistent-arch"}))
    assert main(["plan", QLORA_7B, "--set", f"model.path={tmp_path / 'm'}"]) == 2
    assert "model.path" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("48GiB") == 48 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("1024") == 1024
