"""The finetune stage: methods, merge policies, masked LoRA on a pruned base, checks and bad input."""

from pathlib import Path

import pytest
import torch

from compress import ModelBundle, RecipeError, load_recipe, run
from compress.context import RunContext
from compress.data import load_data
from compress.recipe import DataSpec
from compress.stages.finetune import Finetune, run_finetune
from compress.training import adapters


def _stage(**kw):
    return {"type": "finetune", "lr": 1e-2, "max_steps": 6, "batch_size": 16, **kw}


def _logits(model, bundle):
    ids = bundle.tokenizer(["good happy day", "the cats run"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits


def test_lora_reports_targets_trainable_share_and_merges_exactly(cls_recipe, tmp_path):
    cls_recipe["eval"]["speed"] = False
    cls_recipe["stages"] = [_stage(rank=4, alpha=8)]
    report = run(cls_recipe, show_progress=False)
    info = report.points[-1].stage_info
    assert info["target_modules"] == ["dense", "key", "query", "value"]
    assert info["adapted_layers"] == 13  # 2 layers x 6 linears + pooler; the classifier is trained in full
    assert 0 < info["trainable_percent"] < 20 and info["merge"] == "merge"
    assert info["merge_max_abs_logit_change"] < 1e-5
    assert [s for s, _ in info["loss_curve"]] == list(range(1, 7))
    assert info["samples_per_second"] > 0 and info["peak_rss_bytes"] > 0


def test_qlora_merges_back_into_a_still_quantized_base_that_reloads(lm_recipe):
    lm_recipe["eval"]["speed"] = False
    lm_recipe["stages"] = [_stage(method="qlora", batch_size=8, merge="dequantize-merge-requantize")]
    report = run(lm_recipe, show_progress=False)
    info = report.points[-1].stage_info
    assert info["merge"] == "dequantize-merge-requantize"
    assert info["quantized_layers"] == info["quantized_layers_after_merge"] == 14  # lm_head stays float
    folder = report.points[-1].name
    bundle = ModelBundle.load(f"{lm_recipe['output_dir']}/{folder}")
    assert adapters.count_bnb(bundle.model) == {"Linear4bit": 14}


def test_merge_none_saves_the_adapter_in_peft_format_and_round_trips(cls_recipe, tmp_path):
    cls_recipe["eval"] = {"speed": False, "baseline": False}
    cls_recipe["stages"] = [_stage(merge="none", save_adapter=True)]
    report = run(cls_recipe, show_progress=False)
    out = f"{cls_recipe['output_dir']}/01-finetune"
    assert (tmp_path / "run" / "01-finetune" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "adapters" / "01-finetune" / "adapter_model.safetensors").exists()
    first, second = ModelBundle.load(out), ModelBundle.load(out)
    assert first.format == "peft-adapter" and report.points[-1].stage_info["merge"] == "none"
    assert torch.equal(_logits(first.model, first), _logits(second.model, second))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_masked_lora_keeps_a_pruned_base_exactly_sparse(method, tiny_bert_dir, sentiment_csv, tmp_path):
    data = load_data(DataSpec(source=str(sentiment_csv), label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification")
    from compress.testing import prune_bert_encoder_randomly

    bundle = prune_bert_encoder_randomly(ModelBundle.load(tiny_bert_dir))
    masks = bundle.masks
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work")
    out = run_finetune(bundle, Finetune(method=method, lr=1e-2, max_steps=4, batch_size=16), ctx)
    info = out.facts
    assert info["masked_lora_layers"] == len(masks) == 6
    assert info["pruned_zero_share_before"] == info["pruned_zero_share_after"] == 1.0
    assert adapters.sparsity(out.bundle.model, masks) == 1.0


def test_bad_settings_are_reported_with_the_field_and_fix(cls_recipe, monkeypatch):
    cls_recipe["stages"] = [_stage(rank=0, lr=0)]
    with pytest.raises(RecipeError) as err:
        load_recipe(cls_recipe)
    assert "stages[0].rank: must be > 0 (got 0)" in err.value.problems
    assert "stages[0].lr: must be > 0 (got 0)" in err.value.problems

    monkeypatch.setattr(adapters, "bnb_4bit_problem", lambda device: "RuntimeError: no 4-bit kernel")
    cls_recipe["stages"] = [_stage(target_modules=["query", "qkv_proj"]), _stage(method="qlora"),
                            _stage(optimizer="paged_adamw_8bit"), _stage(merge="dequantize-merge-requantize")]
    with pytest.raises(RecipeError) as err:
        run(cls_recipe, show_progress=False)
    problems = err.value.problems
    assert problems[0] == ("stages[0].target_modules: 'qkv_proj' matches no module of this model; "
                           "candidates: dense, key, query, value")
    assert problems[1].startswith("stages[1].method: qlora needs bitsandbytes 4-bit on cpu, which fails here "
                                  "(RuntimeError: no 4-bit kernel)")
    assert problems[2].startswith("stages[2].optimizer: paged_adamw_8bit pages optimizer state through CUDA")
    assert problems[3].startswith("stages[3].merge: the base is not quantized")


def test_full_finetune_rejects_a_merge_policy():
    with pytest.raises(ValueError, match="full fine-tuning has no adapter to merge"):
        Finetune(method="full", merge="none")


def test_qlora_with_merge_none_saves_a_4bit_base_and_adapter_that_reload(tiny_bert_dir, sentiment_csv, tmp_path):
    """transformers 5 ignored the unwrapped state dict for a quantized base and wrote peft's wrapped
    names, so the folder reloaded with random-initialised 4-bit weights (a crash on CPU)."""
    data = load_data(DataSpec(source=str(sentiment_csv), label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification")
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work")
    out = run_finetune(ModelBundle.load(tiny_bert_dir),
                       Finetune(method="qlora", merge="none", lr=1e-2, max_steps=4, batch_size=16), ctx)
    assert out.bundle.format == "peft-adapter"
    out.bundle.save(tmp_path / "saved")  # the save itself reloads and compares logits
    reloaded = ModelBundle.load(tmp_path / "saved")
    assert adapters.count_bnb(reloaded.model) == {"Linear4bit": 13}  # 2 layers x 6 linears + pooler
    assert torch.equal(_logits(reloaded.model, reloaded), _logits(out.bundle.model, out.bundle))


@pytest.mark.parametrize("merge", ["dequantize-merge-requantize", "none"])
def test_falcon_qlora_kept_in_4bit_saves_and_reloads(merge, lm_text, tmp_path):
    """Falcon's FalconLinear (an nn.Linear subclass) needs compress's loader fix to reload in 4-bit."""
    from compress import testing

    model_dir = testing.make_tiny_model("falcon", tmp_path / "falcon")
    data = load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2), "causal-lm")
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work")
    out = run_finetune(ModelBundle.load(model_dir),
                       Finetune(method="qlora", merge=merge, lr=1e-2, max_steps=3, batch_size=8), ctx)
    assert out.bundle.format == ("hf-bnb" if merge != "none" else "peft-adapter")
    out.bundle.save(tmp_path / "saved")  # compares the reload's logits before the folder is renamed into place
    assert adapters.count_bnb(ModelBundle.load(tmp_path / "saved").model) == {"Linear4bit": 8}


def test_qlora_first_stage_loads_the_base_straight_into_nf4_and_trains_the_same_model(
        tiny_llama_dir, lm_recipe, lm_text, monkeypatch, tmp_path):
    """The recipe's QLoRA never holds the float base: transformers is asked once, with the NF4 config;
    the model it trains equals the one made by the float-then-4-bit path."""
    from compress import bundle as bundle_module
    from compress import loading
    from compress.specs import ModelSpec

    calls = []
    real = bundle_module.from_pretrained_checked

    def spy(task, location, **kwargs):
        calls.append(kwargs.get("quantization_config"))
        return real(task, location, **kwargs)

    monkeypatch.setattr(loading, "from_pretrained_checked", spy)
    stage = {"type": "finetune", "method": "qlora", "lr": 1e-2, "max_steps": 3, "batch_size": 8, "dropout": 0.0}
    lm_recipe["stages"] = [stage]
    lm_recipe["eval"]["speed"] = False
    report = run(lm_recipe)
    assert calls and all(c is not None and c.load_in_4bit for c in calls)  # never in full precision
    assert any("NF4" in n for n in report.baseline.notes)
    assert report.points[1].stage_info["quantized_layers"] == 14
    assert report.points[1].stage_info["merge"] == "merge"

    # Same training from the old path (float model in memory, then reloaded in 4-bit by the stage).
    data = load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2), "causal-lm")
    config = Finetune(**{k: v for k, v in stage.items() if k != "type"})
    direct = loading.load_model(ModelSpec(path=str(tiny_llama_dir), task="causal-lm"), "causal-lm", "cpu", 0,
                                nf4={"compute_dtype": "float32", "double_quant": True, "keep_float": []})
    assert direct.info["qlora_base"]["scheme"] == "nf4"
    float_first = loading.load_model(ModelSpec(path=str(tiny_llama_dir), task="causal-lm"), "causal-lm", "cpu", 0)
    outs = [run_finetune(b, config, RunContext(output_dir=tmp_path / n, seed=1, device="cpu", data=data,
                                               show_progress=False)).bundle
            for n, b in (("direct", direct), ("float", float_first))]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        a, b = (o.model(input_ids=ids).logits for o in outs)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert outs[0].format == outs[1].format == "hf" and "qlora_base" not in outs[0].info


def test_fsdp_or_an_accelerate_fsdp_config_on_cpu_is_refused_before_any_work(cls_recipe, monkeypatch):
    cls_recipe["device"] = "cpu"
    cls_recipe["stages"] = [_stage(fsdp={"sharding_strategy": "FULL_SHARD"})]
    with pytest.raises(RecipeError) as err:
        run(cls_recipe)
    assert err.value.problems[0].startswith("stages[0].fsdp: FSDP (from this stage) shards the weights themselves")
    cls_recipe["stages"] = [_stage()]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.raises(RecipeError) as err:
        run(cls_recipe)
    assert "FSDP (from the accelerate config)" in err.value.problems[0]
    assert "launch without that accelerate config" in err.value.problems[0]
    assert not Path(cls_recipe["output_dir"]).exists()  # refused before the run folder was made


def test_the_recipe_distributed_section_reaches_every_training_stage_and_is_refused_on_cpu(cls_recipe):
    from compress.recipe import Recipe

    cls_recipe["device"] = "cpu"
    cls_recipe["distributed"] = {"fsdp": {"fsdp_version": 2}}
    own = {"deepspeed": {"zero_optimization": {"stage": 2}}}
    cls_recipe["stages"] = [_stage(), _stage(**own), {"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    recipe = Recipe.model_validate(cls_recipe)
    assert recipe.stages[0].fsdp == {"fsdp_version": 2} and recipe.stages[0].deepspeed is None
    assert recipe.stages[1].fsdp is None and recipe.stages[1].deepspeed == own["deepspeed"]  # its own wins
    assert not hasattr(recipe.stages[2], "fsdp")
    # The resolved recipe says the same thing when read back (a resumed run trains the same way).
    again = Recipe.model_validate(recipe.to_dict(explicit_only=True))
    assert again.stages[0].fsdp == recipe.stages[0].fsdp and again.stages[1].deepspeed == own["deepspeed"]
    cls_recipe["stages"] = [_stage()]
    with pytest.raises(RecipeError) as err:
        run(cls_recipe)
    message = err.value.problems[0]
    assert message.startswith("stages[0].fsdp: FSDP (from the recipe's distributed section) shards the weights")
    assert "remove distributed.fsdp; on several GPUs train with plain data parallelism" in message
    assert not Path(cls_recipe["output_dir"]).exists()


def test_a_distributed_section_without_settings_or_with_both_is_refused(cls_recipe):
    for section, words in (({}, "give fsdp or deepspeed"), ({"fsdp": {}, "deepspeed": {}}, "exclude each other")):
        cls_recipe["distributed"] = section
        with pytest.raises(RecipeError) as err:
            run(cls_recipe)
        assert any(p.startswith("distributed") and words in p for p in err.value.problems), err.value.problems


def test_sharding_a_4bit_base_on_gpus_is_refused_with_the_reason():
    from compress.stages.finetune import Finetune
    from compress.training.sharding import sharding_problems

    config = Finetune(method="qlora", deepspeed={"zero_optimization": {"stage": 2}})
    assert sharding_problems(config, "cuda") == []
    (problem,) = sharding_problems(config, "cuda", four_bit=True)
    assert problem.startswith("deepspeed: DeepSpeed (from this stage) cannot shard a 4-bit (bitsandbytes) base")
    assert problem.endswith("remove deepspeed")


@pytest.mark.parametrize(("fields", "env", "refused"), [
    ({"fsdp": {"fsdp_version": 2}}, {}, "FSDP"),
    ({"fsdp": {"sharding_strategy": "FULL_SHARD"}}, {}, "FSDP"),
    ({"fsdp": {"sharding_strategy": "NO_SHARD"}}, {}, None),  # FSDP1 without sharding: whole weights
    ({"deepspeed": {"zero_optimization": {"stage": 3}}}, {}, "DeepSpeed ZeRO-3"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, {}, None),
    ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP"),
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),
])
def test_sharding_the_weights_themselves_is_refused_on_gpus_too(monkeypatch, fields, env, refused):
    from compress.stages.finetune import Finetune
    from compress.training.sharding import sharding_problems

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    problems = sharding_problems(Finetune(method="lora", **fields), "cuda")
    if refused is None:
        assert problems == []
    else:
        (problem,) = problems
        assert f"{refused} (from " in problem and "shards the weights themselves" in problem
        assert "plain data parallelism (torchrun" in problem


def test_weights_left_in_shards_after_training_are_caught(tmp_path):
    """The guard behind the refusal: a DTensor (FSDP2) or a ZeRO-3 partition is named, never saved."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from compress.training.sharding import sharded_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert sharded_weights(model) is None
    partition = torch.nn.Parameter(torch.zeros(0))
    partition.ds_numel = 8  # what DeepSpeed ZeRO-3 leaves on a process outside its gather
    holder = torch.nn.Module()
    holder.weight = partition
    assert "DeepSpeed ZeRO-3 partition (0 of 8 values)" in sharded_weights(holder)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fully_shard(model)
        assert sharded_weights(model).startswith("parameter 0.weight is an FSDP shard (DTensor")
    finally:
        dist.destroy_process_group()
