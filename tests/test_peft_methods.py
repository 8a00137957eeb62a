"""PEFT methods beyond LoRA (IA³, LoHa, LoKr, VeRA, prompt/prefix/P-tuning): training, adapter-only
saving that plain peft reloads exactly, merge allowed or refused with the reason, pruned bases kept
sparse or refused, 4-bit bases, and each check broken on purpose."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from compress import ModelBundle, RecipeError, load_recipe
from compress.context import RunContext
from compress.data import load_data
from compress.errors import StageError
from compress.recipe import DataSpec
from compress.stages import finetune as ft
from compress.stages.finetune import Finetune, check_finetune, run_finetune
from compress.training import adapters

MERGEABLE = ["ia3", "loha", "lokr", "vera"]
PROMPT = ["prompt-tuning", "prefix-tuning", "p-tuning"]
# Small settings so the tiny models train in a few steps (VeRA's default rank 256 exceeds hidden 64).
SETTINGS = {"vera": {"rank": 16}, "loha": {"rank": 4}, "lokr": {"rank": 4},
            "prompt-tuning": {"num_virtual_tokens": 4}, "prefix-tuning": {"num_virtual_tokens": 4},
            "p-tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32}}


@pytest.fixture(scope="module")
def cls_data(sentiment_csv):
    return load_data(DataSpec(source=str(sentiment_csv), label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification")


@pytest.fixture(scope="module")
def lm_data(lm_text):
    return load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2), "causal-lm")


def _config(method, **kw):
    return Finetune(method=method, **{"lr": 2e-2, "max_steps": 4, "batch_size": 16, **SETTINGS.get(method, {}), **kw})


def _ctx(tmp_path, data):
    return RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work",
                      show_progress=False)


def _inputs(bundle):
    return bundle.tokenizer(["good happy day", "the cats run fast"], return_tensors="pt", padding=True)


def _logits(model, bundle):
    model.eval()
    with torch.inference_mode():
        return model(**{k: v for k, v in _inputs(bundle).items() if k != "token_type_ids"}).logits


def _pruned_bert(tiny_bert_dir):
    from compress.testing import prune_bert_encoder_randomly

    return prune_bert_encoder_randomly(ModelBundle.load(tiny_bert_dir), seed=0)


# ------------------------------------------------------------------------------- train, save, reload


@pytest.mark.parametrize("method", [m for m in MERGEABLE + PROMPT if m != "prefix-tuning"])
# The Llama half runs by default; the BERT half (the classifier head saved with the adapter) in the slow
# step, since the pruned-BERT and round-trip tests below already train every method on BERT.
@pytest.mark.parametrize("model", ["llama", pytest.param("bert", marks=pytest.mark.slow)])
def test_method_trains_saves_adapter_only_and_plain_peft_reloads_it_exactly(
        method, model, tiny_bert_dir, tiny_llama_dir, cls_data, lm_data, tmp_path):
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict

    model_dir, data = (tiny_bert_dir, cls_data) if model == "bert" else (tiny_llama_dir, lm_data)
    config = _config(method, merge="none", save_adapter=True)
    out = run_finetune(ModelBundle.load(model_dir), config, _ctx(tmp_path, data))
    facts, trained = out.facts, out.bundle.model
    assert facts["method"] == method and facts["merge"] == "none" and out.bundle.format == "peft-adapter"

    # It trained: the adapter moved away from its initial values (same seed, same peft config).
    base = ModelBundle.load(model_dir)
    torch.manual_seed(0)
    fresh = get_peft_model(base.model, ft.method_of(config).peft_config(config, base.model, base.task))
    before, after = get_peft_model_state_dict(fresh), get_peft_model_state_dict(trained)
    assert before.keys() == after.keys()
    moved = [k for k in after if not torch.equal(before[k], after[k])]
    assert [k for k in moved if "classifier" not in k]  # the adapter itself, not only the head

    # Adapter-only, PEFT format: what it holds is the adapter (and the head), not the base.
    saved = load_file(f"{facts['adapter_dir']}/adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in after.values())
    assert sum(t.numel() for t in saved.values()) < facts["trainable_parameters"] + 20_000  # VeRA: + projections

    reloaded = PeftModel.from_pretrained(ModelBundle.load(model_dir).model, facts["adapter_dir"])
    assert torch.equal(_logits(reloaded, base), _logits(trained, base))


def test_prefix_tuning_trains_on_a_decoder_and_reloads_exactly(tiny_llama_dir, lm_data, tmp_path):
    from peft import PeftModel

    out = run_finetune(ModelBundle.load(tiny_llama_dir), _config("prefix-tuning", save_adapter=True),
                       _ctx(tmp_path, lm_data))
    assert out.facts["merge"] == "none"  # the default for a method that cannot merge
    assert out.facts["trainable_parameters"] == 4 * 2 * 2 * 32  # tokens x layers x (k, v) x kv width
    reloaded = PeftModel.from_pretrained(ModelBundle.load(tiny_llama_dir).model, out.facts["adapter_dir"])
    assert torch.equal(_logits(reloaded, out.bundle), _logits(out.bundle.model, out.bundle))


LORA_FAMILY = ["lora", "dora", "qlora"]


@pytest.mark.parametrize("method", LORA_FAMILY)
def test_lora_family_on_a_llama_saves_an_adapter_that_plain_peft_reloads_exactly(
        method, tiny_llama_dir, lm_data, tmp_path):
    from peft import PeftModel

    out = run_finetune(ModelBundle.load(tiny_llama_dir), _config(method, merge="none", save_adapter=True),
                       _ctx(tmp_path, lm_data))
    assert out.facts["merge"] == "none" and out.bundle.format == "peft-adapter"
    saved = load_file(f"{out.facts['adapter_dir']}/adapter_model.safetensors")
    # It trained: LoRA's B starts at zero, so a non-zero B is the update (DoRA adds its magnitudes).
    assert [k for k, t in saved.items() if "lora_B" in k and t.abs().sum() > 0]
    assert sum(t.numel() for t in saved.values()) == out.facts["trainable_parameters"]
    base = ModelBundle.load(tiny_llama_dir)
    fresh = base.model
    if method == "qlora":  # plain peft on a fresh NF4 copy of the same base
        fresh = adapters.load_4bit(base.model, base.task, tmp_path / "nf4-again", compute_dtype="float32",
                                   double_quant=True, skip=adapters.keep_float(base.model))
        assert adapters.count_bnb(fresh) == {"Linear4bit": 14} == {
            k: v for k, v in adapters.count_bnb(out.bundle.model).items()}
    reloaded = PeftModel.from_pretrained(fresh, out.facts["adapter_dir"])
    assert torch.equal(_logits(reloaded, base), _logits(out.bundle.model, base))


def test_full_finetune_on_a_llama_saves_a_folder_plain_transformers_reloads_exactly(
        tiny_llama_dir, lm_data, tmp_path):
    """Full fine-tuning has no adapter: its output is a plain Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    out = run_finetune(ModelBundle.load(tiny_llama_dir), _config("full", lr=1e-3), _ctx(tmp_path, lm_data))
    base = ModelBundle.load(tiny_llama_dir)
    assert not torch.equal(_logits(out.bundle.model, base), _logits(base.model, base))  # it trained
    out.bundle.save(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(reloaded, base), _logits(out.bundle.model, base))


def test_every_finetune_method_has_a_tiny_llama_train_save_reload_test():
    """A method registered without a Llama round-trip test above fails here (the issue's done-when)."""
    covered = set(MERGEABLE + PROMPT + LORA_FAMILY) | {"full"}
    assert set(ft.FINETUNE_METHODS.names()) == covered


def test_the_bundle_format_round_trips_a_non_lora_adapter(tiny_bert_dir, cls_data, tmp_path):
    """The peft-adapter format strips each method's own adapter layers (not only `lora_` keys)."""
    out = run_finetune(ModelBundle.load(tiny_bert_dir), _config("loha", merge="none"), _ctx(tmp_path, cls_data))
    out.bundle.save(tmp_path / "saved")  # the save reloads and compares logits itself
    again = ModelBundle.load(tmp_path / "saved")
    assert again.format == "peft-adapter"
    assert torch.equal(_logits(again.model, again), _logits(out.bundle.model, out.bundle))
    base_keys = load_file(str(tmp_path / "saved" / "model.safetensors")).keys()
    assert not any("hada_" in k or "base_layer" in k or "modules_to_save" in k for k in base_keys)


# ------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("method", MERGEABLE)
def test_mergeable_methods_merge_exactly_into_plain_weights(method, tiny_llama_dir, lm_data, tmp_path):
    out = run_finetune(ModelBundle.load(tiny_llama_dir), _config(method), _ctx(tmp_path, lm_data))
    assert out.facts["merge"] == "merge" and out.bundle.format == "hf"
    assert out.facts["merge_relative_logit_change"] <= 1e-5
    assert not hasattr(out.bundle.model, "peft_config")  # a plain transformers model


@pytest.mark.parametrize("method", PROMPT)
def test_prompt_methods_refuse_a_merge_with_the_reason(method):
    with pytest.raises(ValueError, match="learns virtual tokens fed to the model, not a change of its weights"):
        Finetune(method=method, merge="merge")
    recipe = {"name": "t", "model": {"path": "m"}, "data": {"source": "d.csv"},
              "stages": [{"type": "finetune", "method": method, "merge": "dequantize-merge-requantize"}]}
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert err.value.problems[0].startswith("stages[0].merge: 'dequantize-merge-requantize' is impossible")
    assert Finetune(method=method).merge is None and ft.default_policy(Finetune(method=method), False) == "none"


def test_flat_yaml_keeps_working_and_another_methods_field_is_refused_by_name():
    recipe = {"name": "t", "model": {"path": "m"}, "data": {"source": "d.csv"},
              "stages": [{"type": "finetune", "method": "ia3", "target_modules": ["key", "value", "output.dense"],
                          "feedforward_modules": ["output.dense"]}]}
    stage = load_recipe(recipe).stages[0]
    assert type(stage).__name__ == "IA3" and stage.feedforward_modules == ["output.dense"]
    recipe["stages"][0]["rank"] = 8
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert err.value.problems[0] == ("stages[0]: rank: applies to method lora / dora / qlora / loha / lokr / vera "
                                     "only (this stage's method is ia3); remove it")
    with pytest.raises(ValueError, match="feedforward_modules: required with target_modules"):
        Finetune(method="ia3", target_modules=["key"])


def test_ia3_defaults_to_its_own_larger_lr_and_a_recipe_lr_still_wins():
    # IA³ trains scaling vectors only: the shared default (2e-4, LoRA's) barely moves them (bench_finetune).
    def stage(**fields):
        return load_recipe({"name": "t", "model": {"path": "m"}, "data": {"source": "d.csv"},
                            "stages": [{"type": "finetune", **fields}]}).stages[0]

    assert stage(method="ia3").lr == 3e-2
    assert stage(method="lora").lr == stage(method="loha").lr == 2e-4
    assert stage(method="ia3", lr=1e-3).lr == 1e-3


def test_a_wrong_merge_is_caught_by_the_logit_check(tiny_llama_dir, lm_data, tmp_path, monkeypatch):
    """Break it on purpose: a 'merge' that drops the adapter changes the logits, and the stage fails."""
    monkeypatch.setattr(adapters, "merge_with_peft", lambda model, masks: model.unload())
    with pytest.raises(StageError, match=r"merge \(merge\) changed the model"):
        run_finetune(ModelBundle.load(tiny_llama_dir), _config("loha", lr=5e-2), _ctx(tmp_path, lm_data))


# ------------------------------------------------------------------------------- pruned bases


@pytest.mark.parametrize(("method", "how"), [("loha", "masked"), ("lokr", "masked"), ("vera", "masked"),
                                             ("ia3", "keeps"), ("prompt-tuning", "untouched")])
def test_pruned_base_keeps_its_zeros_through_training_and_merge(method, how, tiny_bert_dir, cls_data, tmp_path):
    bundle = _pruned_bert(tiny_bert_dir)
    masks = bundle.masks
    out = run_finetune(bundle, _config(method), _ctx(tmp_path, cls_data))
    assert ft.method_of(_config(method)).pruned == how
    assert out.facts["masked_lora_layers"] == (len(masks) if how == "masked" else 0)
    assert out.facts["pruned_zero_share_before"] == out.facts["pruned_zero_share_after"] == 1.0
    assert adapters.sparsity(out.bundle.model, masks) == 1.0
    if how != "untouched":
        assert out.facts["merge"] == "merge" and out.facts["merge_relative_logit_change"] <= 1e-5


def test_a_dense_update_on_a_pruned_base_is_caught(tiny_bert_dir, cls_data, tmp_path, monkeypatch):
    """Break it on purpose: LoHa trained and merged without its mask fills pruned weights; the stage fails."""
    monkeypatch.setattr(adapters, "enable_masked", lambda model, masks: 0)
    with pytest.raises(StageError, match="the pruned weights are no longer zero after training"):
        run_finetune(_pruned_bert(tiny_bert_dir), _config("loha"), _ctx(tmp_path, cls_data))


def test_a_method_wrongly_claiming_to_keep_zeros_is_caught(tiny_bert_dir, cls_data, tmp_path, monkeypatch):
    """Break it on purpose: a handler that says 'keeps' for an additive method (no masking)."""
    real = ft.method_of
    monkeypatch.setattr(ft, "method_of", lambda config: dataclasses.replace(real(config), pruned="keeps"))
    with pytest.raises(StageError, match=r"lokr claims to keep the zeros: keeps"):
        run_finetune(_pruned_bert(tiny_bert_dir), _config("lokr"), _ctx(tmp_path, cls_data))


def test_dora_is_refused_on_a_pruned_base_before_work(tiny_bert_dir, cls_data, tmp_path):
    problems = check_finetune(_pruned_bert(tiny_bert_dir), Finetune(method="dora"), _ctx(tmp_path, cls_data))
    assert problems == [("method: DoRA rescales whole weight columns, so it cannot keep the pruned weights at zero; "
                        "use method: lora (masked LoRA keeps the sparsity)")]


def test_prefix_tuning_passes_the_check_on_a_decoder(tiny_llama_dir, lm_data, tmp_path):
    # transformers 5.24 calls the cache argument `cache`; the check looked only for `past_key_values`
    # and refused every decoder (SmolLM2's benchmark row found it).
    assert check_finetune(ModelBundle.load(tiny_llama_dir), Finetune(method="prefix-tuning"),
                          _ctx(tmp_path, lm_data)) == []


def test_prefix_tuning_is_refused_on_an_encoder_before_work(tiny_bert_dir, cls_data, tmp_path):
    problems = check_finetune(ModelBundle.load(tiny_bert_dir), Finetune(method="prefix-tuning"),
                              _ctx(tmp_path, cls_data))
    assert problems == [("method: prefix-tuning feeds learned keys/values as past key values, which "
                        "BertForSequenceClassification does not take; use method: prompt-tuning or p-tuning")]


# ------------------------------------------------------------------------------- 4-bit bases


@pytest.fixture
def nf4_llama(tiny_llama_dir, tmp_path):
    bundle = ModelBundle.load(tiny_llama_dir)
    bundle.model = adapters.load_4bit(bundle.model, bundle.task, tmp_path / "nf4", compute_dtype="float32",
                                      double_quant=True, skip=adapters.keep_float(bundle.model))
    assert adapters.count_bnb(bundle.model) == {"Linear4bit": 14}
    return bundle


@pytest.mark.parametrize("method", ["ia3", "prompt-tuning"])
def test_methods_peft_runs_on_bnb_train_on_a_4bit_base_and_keep_the_adapter(
        method, nf4_llama, tiny_llama_dir, lm_data, tmp_path):
    from peft import PeftModel

    ctx = _ctx(tmp_path, lm_data)
    assert check_finetune(nf4_llama, _config(method), ctx) == []
    out = run_finetune(nf4_llama, _config(method, save_adapter=True), ctx)
    assert out.facts["merge"] == "none" and out.facts["quantized_layers"] == 14
    assert adapters.count_bnb(out.bundle.model) == {"Linear4bit": 14}
    # Plain peft on a fresh 4-bit copy of the same base computes the same logits.
    base = ModelBundle.load(tiny_llama_dir)
    fresh = adapters.load_4bit(base.model, base.task, tmp_path / "nf4-again", compute_dtype="float32",
                               double_quant=True, skip=adapters.keep_float(base.model))
    reloaded = PeftModel.from_pretrained(fresh, out.facts["adapter_dir"])
    assert torch.equal(_logits(reloaded, base), _logits(out.bundle.model, base))


@pytest.mark.parametrize(("method", "field", "reason"), [
    ("loha", "method", "peft's LoHa wraps bitsandbytes layers as if they were float Linear layers"),
    ("lokr", "method", "peft's LoKr wraps bitsandbytes layers"),
    ("vera", "method", "peft's VeRA adapts torch Linear and Conv1D layers only"),
    ("ia3", "merge", "peft cannot merge IA³ into a 4-bit base"),
])
def test_methods_that_cannot_use_a_4bit_base_are_refused_with_the_reason(method, field, reason, nf4_llama,
                                                                         lm_data, tmp_path):
    config = _config(method, **({"merge": "merge"} if field == "merge" else {}))
    problems = check_finetune(nf4_llama, config, _ctx(tmp_path, lm_data))
    assert len(problems) == 1 and problems[0].startswith(f"{field}: ") and reason in problems[0]


@pytest.mark.parametrize("method", ["loha", "vera", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning"])
def test_the_memory_plan_counts_the_trainable_parameters_peft_trains(method, tiny_llama_dir, lm_recipe):
    from peft import get_peft_model

    from compress.plan.planner import plan_recipe

    config = _config(method)
    base = ModelBundle.load(tiny_llama_dir)
    model = get_peft_model(base.model, ft.method_of(config).peft_config(config, base.model, base.task))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lm_recipe["stages"] = [{"type": "finetune", "method": method, **SETTINGS.get(method, {})}]
    row = next(r for r in plan_recipe(load_recipe(lm_recipe), device="cpu", check_devices=False).stages
               if r.label.startswith("1 finetune"))
    assert row.parts["adapters"] == trainable * 4  # fp32
