"""Reliability and security: kills, Ctrl-C, full disks, corrupted outputs, hostile inputs."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from compress import DataError, ModelError, RecipeError, load_recipe, registry, run
from compress.errors import CompressError, RunFolderError

STEPS = {"type": "finetune", "method": "full", "lr": 5e-3, "max_steps": 12, "batch_size": 8, "checkpoint_every": 1}


def _cli(recipe_path, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "compress.cli", "run", str(recipe_path), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting")


def _accuracy_points(report):
    return [(p.name, p.accuracy.model_dump(), p.size.parameters, p.size.nonzero_parameters) for p in report.points]


def _recipe(cls_recipe, tmp_path, name="r.yaml"):
    cls_recipe["eval"]["speed"] = False
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cls_recipe))
    return path


def test_sigkill_mid_stage_then_resume_reproduces_an_uninterrupted_run(cls_recipe, tmp_path):
    cls_recipe["stages"] = [STEPS, {**STEPS, "lr": 2e-3}]
    path = _recipe(cls_recipe, tmp_path)
    out = Path(cls_recipe["output_dir"])
    proc = _cli(path)
    # Kill once stage 2 has written a mid-stage checkpoint.
    _wait_for(lambda: (out / ".work-02-finetune" / "checkpoint").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # killed: nothing could record it

    resumed = run(path, resume=True)
    clean = run({**cls_recipe, "output_dir": str(tmp_path / "clean")})
    assert resumed.status == "complete"
    for (n1, acc1, p1, nz1), (n2, acc2, p2, nz2) in zip(_accuracy_points(resumed), _accuracy_points(clean),
                                                        strict=True):
        assert n1 == n2 and p1 == p2 and abs(nz1 - nz2) <= 2
        assert acc1["accuracy"] == pytest.approx(acc2["accuracy"], abs=1e-6)
        assert acc1["eval_loss"] == pytest.approx(acc2["eval_loss"], rel=1e-4, abs=1e-5)


def test_sigint_stops_at_a_step_boundary_and_exits_130(cls_recipe, tmp_path):
    cls_recipe["stages"] = [{**STEPS, "max_steps": 400}]
    path = _recipe(cls_recipe, tmp_path)
    out = Path(cls_recipe["output_dir"])
    proc = _cli(path)
    _wait_for(lambda: (out / ".work-01-finetune" / "checkpoint").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted" and report["failed_stage"] == "01-finetune"
    state = json.loads((out / ".work-01-finetune" / "checkpoint" / "state.json").read_text())
    assert 0 < state["steps"] < 400


def test_disk_full_while_saving_keeps_the_previous_stage(cls_recipe, tmp_path, monkeypatch):
    from compress.bundle import ModelBundle

    cls_recipe["stages"] = [STEPS, {**STEPS, "lr": 1e-3}]
    out = Path(cls_recipe["output_dir"])
    calls = []
    real_save = ModelBundle.save

    def save(self, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, path)

    monkeypatch.setattr(ModelBundle, "save", save)
    with pytest.raises(CompressError, match=r"disk full while writing .*finished stages are intact.*--resume"):
        run(cls_recipe)
    assert ModelBundle.load(out / "01-finetune").task == "sequence-classification"
    assert not (out / "02-finetune").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and report["failed_stage"] == "02-finetune"


def test_corrupted_weights_are_detected_on_resume_and_the_stage_reruns(cls_recipe, monkeypatch, caplog):
    cls_recipe["stages"] = [STEPS, {**STEPS, "lr": 1e-3}]
    cls_recipe["eval"]["speed"] = False
    first = run(cls_recipe)
    weights = Path(cls_recipe["output_dir"]) / "01-finetune" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    entry = registry.get_stage("finetune")
    calls = []
    monkeypatch.setitem(registry._STAGES, "finetune", dataclasses.replace(
        entry, run=lambda b, c, ctx: calls.append(c) or entry.run(b, c, ctx)))
    again = run(cls_recipe, resume=True)
    assert len(calls) == 2  # stage 1 re-ran, so stage 2 (its consumer) re-ran too
    assert "01-finetune: model.safetensors is truncated or changed" in caplog.text
    assert _accuracy_points(again) == _accuracy_points(first)


def test_same_recipe_and_seed_give_the_same_metrics(cls_recipe, tmp_path):
    cls_recipe["stages"] = [{**STEPS, "max_steps": 5}]
    cls_recipe["eval"]["speed"] = False
    a = run(cls_recipe)
    b = run({**cls_recipe, "output_dir": str(tmp_path / "again")})
    assert _accuracy_points(a) == _accuracy_points(b)
    manifest = json.loads((Path(cls_recipe["output_dir"]) / "run.json").read_text())
    assert manifest["seed"] == 0 and manifest["environment"]["versions"]["torch"] == torch.__version__


# ---------------------------------------------------------------------------- hostile inputs


def _yaml(tmp_path, text):
    path = tmp_path / "h.yaml"
    path.write_text(text)
    return path


def test_alias_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 20)]
    with pytest.raises(RecipeError, match="more than 100 aliases"):
        load_recipe(_yaml(tmp_path, "\n".join(lines)))


def test_deep_nesting_and_huge_files_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="nesting deeper than 32 levels"):
        load_recipe(_yaml(tmp_path, "a: " + "[" * 200 + "]" * 200))
    with pytest.raises(RecipeError, match="larger than 1024 KiB"):
        load_recipe(_yaml(tmp_path, "name: x\n" + "#" * (1 << 20)))


def test_output_and_package_path_traversal_are_refused(cls_recipe):
    with pytest.raises(RecipeError, match=r"output_dir: must not contain '\.\.'"):
        load_recipe({**cls_recipe, "output_dir": "runs/../../etc"})
    with pytest.raises(RecipeError, match="pkg: paths stay inside their package"):
        load_recipe({**cls_recipe, "model": {"path": "pkg:compress/../../../etc"}})


def test_symlinked_output_folder_is_refused(cls_recipe, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    with pytest.raises(RunFolderError, match="is a symbolic link"):
        run({**cls_recipe, "output_dir": str(link)})
    assert list(elsewhere.iterdir()) == []


def test_pickle_only_model_is_refused_unless_allowed(cls_recipe, tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_bert_dir.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(tiny_bert_dir / "model.safetensors")), folder / "pytorch_model.bin")
    cls_recipe["model"]["path"] = str(folder)
    cls_recipe["eval"].update(speed=False)
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        run(cls_recipe)
    assert not Path(cls_recipe["output_dir"]).exists()


def test_remote_code_needs_opt_in(cls_recipe, tiny_bert_dir, tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    for f in tiny_bert_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil-bert", auto_map={"AutoConfig": "evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    cls_recipe["model"]["path"] = str(folder)
    with pytest.raises(ModelError, match="ships its own model code.*trust_remote_code: true"):
        run(cls_recipe)


def test_hub_token_in_recipe_is_refused_and_never_echoed(cls_recipe, monkeypatch, capsys):
    token = "hf_" + "AbCdEf0123456789" * 2
    with pytest.raises(RecipeError) as info:
        load_recipe({**cls_recipe, "description": f"uses {token}"})
    assert "description: looks like a Hugging Face token" in str(info.value)
    assert token not in str(info.value)
    monkeypatch.setenv("MY_SECRET", token)
    with pytest.raises(RecipeError, match="description: expands to what looks like a Hugging Face token") as info:
        load_recipe({**cls_recipe, "description": "${MY_SECRET}"})
    assert token not in str(info.value)


def test_labels_outside_the_label_set(cls_recipe, tmp_path):
    import csv

    path = tmp_path / "split"
    path.mkdir()
    for split, labels in (("train", ["positive", "negative"]), ("test", ["positive", "angry"])):
        with open(path / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows([[f"good day {i}", labels[i % 2]] for i in range(10)])
    cls_recipe["data"].update(source=str(path), eval_split="test")
    with pytest.raises(DataError, match=r"labels \['angry'\] of the held-out split are not in the training split"):
        run(cls_recipe)
    cls_recipe["data"].update(source=str(path / "train.csv"), eval_split=None)
    cls_recipe["model"]["num_labels"] = 2
    cls_recipe["data"]["source"] = str(tmp_path / "three.csv")
    from compress.testing import write_sentiment_csv

    write_sentiment_csv(tmp_path / "three.csv", 30)
    with pytest.raises(DataError, match="model.num_labels: 2 is fewer than the 3 labels in the data"):
        run(cls_recipe)


def test_sparsity_and_bit_width_survive_prune_lora_merge_quantize(lm_recipe):
    """2:4 pruning -> LoRA recovery (masked, merged) -> int8 weights: zeros and 8-bit layers at the end."""
    lm_recipe["eval"]["speed"] = False
    lm_recipe["stages"] = [
        {"type": "prune", "structure": "n:m", "pattern": "2:4", "method": "magnitude"},
        {"type": "finetune", "method": "lora", "rank": 4, "lr": 1e-2, "max_steps": 6, "batch_size": 8},
        {"type": "quantize", "scheme": "int8-weight"},
    ]
    report = run(lm_recipe)
    pruned, tuned, quantized = report.points[1:]
    for point in (pruned, tuned, quantized):
        linear = [layer for layer in point.size.layers if "proj" in layer.name]
        assert len(linear) == 14
        # 2:4 keeps at most half of every linear layer, after training and after quantization too.
        assert all(layer.nonzero <= layer.parameters // 2 for layer in linear), point.name
    assert tuned.accuracy.perplexity != pruned.accuracy.perplexity  # the LoRA update really changed the model
    q_linear = [layer for layer in quantized.size.layers if "proj" in layer.name]
    assert all(8 <= layer.bits_per_weight < 9 for layer in q_linear)
    assert all(layer.bits_per_weight == 32 for layer in tuned.size.layers if "proj" in layer.name)
    assert quantized.size.disk_bytes < 0.5 * tuned.size.disk_bytes
