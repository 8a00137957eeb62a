"""ModelBundle save/load: Hugging Face folders, equal logits, lineage and masks kept, atomic writes."""

import json

import pytest
import torch

from compress.bundle import BUNDLE_FILE, ModelBundle, auto_class, detect_task, load_tokenizer
from compress.errors import ModelError


def _bundle(path, task):
    return ModelBundle(model=auto_class(task).from_pretrained(path).eval(), tokenizer=load_tokenizer(path),
                       task=task, source=str(path))


def _logits(bundle, text="the good car was very nice"):
    inputs = bundle.tokenizer([text], return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        return bundle.model(**inputs).logits


@pytest.mark.parametrize("fixture,task", [("tiny_bert_dir", "sequence-classification"),
                                          ("tiny_llama_dir", "causal-lm")])
def test_save_load_round_trip_gives_equal_logits(request, tmp_path, fixture, task):
    bundle = _bundle(request.getfixturevalue(fixture), task)
    bundle.record("finetune", {"lr": 0.1}, steps=3)
    name = next(n for n, p in bundle.model.named_parameters() if p.dim() == 2)
    bundle.masks = {name: torch.rand_like(dict(bundle.model.named_parameters())[name]) > 0.5}
    out = bundle.save(tmp_path / "saved")

    loaded = ModelBundle.load(out)
    assert loaded.task == task
    assert loaded.lineage == [{"stage": "finetune", "settings": {"lr": 0.1}, "steps": 3}]
    assert torch.equal(loaded.masks[name], bundle.masks[name])
    torch.testing.assert_close(_logits(loaded), _logits(bundle), rtol=0, atol=0)
    # The folder is a plain Hugging Face folder: from_pretrained reloads it without compress.
    plain = auto_class(task).from_pretrained(out).eval()
    with torch.no_grad():
        inputs = bundle.tokenizer(["the good car"], return_tensors="pt")
        inputs.pop("token_type_ids", None)
        torch.testing.assert_close(plain(**inputs).logits, bundle.model(**inputs).logits)
    assert (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path, tiny_bert_dir):
    bundle = _bundle(tiny_bert_dir, "sequence-classification")
    target = tmp_path / "stage"
    bundle.save(target)
    bundle.record("x", {})
    bundle.save(target)
    assert json.loads((target / BUNDLE_FILE).read_text())["lineage"] == [{"stage": "x", "settings": {}}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_failed_save_keeps_previous_copy(tmp_path, tiny_bert_dir, monkeypatch):
    bundle = _bundle(tiny_bert_dir, "sequence-classification")
    target = bundle.save(tmp_path / "stage")
    before = (target / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(bundle.model, "save_pretrained", boom)
    with pytest.raises(OSError, match="No space left"):
        bundle.save(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    ModelBundle.load(target)


def test_replace_copies_lineage(tiny_bert_dir):
    bundle = _bundle(tiny_bert_dir, "sequence-classification")
    other = bundle.replace()
    other.record("prune", {})
    assert bundle.lineage == [] and len(other.lineage) == 1


def test_detect_task(tiny_bert_dir, tiny_llama_dir, tmp_path):
    assert detect_task(tiny_bert_dir) == "sequence-classification"
    assert detect_task(tiny_llama_dir) == "causal-lm"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, vocab_size=50)).save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelError, match=r"model.task: cannot tell the task from architectures \['BertModel'\]"):
        detect_task(tmp_path / "bare")


def _drop_and_add_weights(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in weights if "layers.1.mlp.up_proj" in k)
    weights["model.layers.9.mlp.up_proj.weight"] = weights.pop(dropped)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return dropped


def test_a_folder_whose_weights_do_not_match_its_config_is_refused(tiny_llama_dir, tmp_path):
    """transformers would initialise the missing layer at random and drop the stray one, silently."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, folder)
    dropped = _drop_and_add_weights(folder)
    with pytest.raises(ModelError) as err:
        ModelBundle.load(folder)
    assert f"1 missing ({dropped})" in str(err.value)
    assert "1 unexpected (model.layers.9.mlp.up_proj.weight)" in str(err.value)


def test_a_base_model_may_lack_only_its_new_task_head(tiny_llama_dir, tiny_bert_dir, tmp_path):
    import shutil

    from compress.bundle import from_pretrained_checked

    # A classifier head that the checkpoint lacks is initialised by design: accepted.
    folder = tmp_path / "headless"
    shutil.copytree(tiny_bert_dir, folder)
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("classifier")}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    from_pretrained_checked("sequence-classification", str(folder), base=True)
    # A backbone layer that is missing is not.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    _drop_and_add_weights(broken)
    with pytest.raises(ModelError, match="weights do not match its config.json — 1 missing"):
        from_pretrained_checked("causal-lm", str(broken), base=True)


def test_a_save_that_does_not_reproduce_the_model_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    """Break the property on purpose: a format whose saver loses a weight; the save must refuse."""
    from compress import bundle as bundle_module

    b = _bundle(tiny_llama_dir, "causal-lm")

    def lossy_save(bundle, folder):
        bundle.model.save_pretrained(folder)
        bundle.model.model.layers[0].mlp.up_proj.weight.data.mul_(2)  # the in-memory model moves on

    monkeypatch.setitem(bundle_module._FORMATS, "hf", bundle_module.ModelFormat("hf", lossy_save,
                                                                              bundle_module._hf_load))
    with pytest.raises(ModelError, match="the folder reloads with different outputs"):
        b.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()
