"""The command line: exit codes, messages, and nothing written on bad input."""

import json

import pytest
import yaml

from compress.cli import main


def _recipe_file(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_validate_names_all_three_mistakes(tmp_path, cls_recipe, capsys):
    cls_recipe["stages"] = [{"type": "finetune", "rnak": 8}, {"type": "finetune", "lr": 0},
                            {"type": "finetune", "dropout": 1.5}]
    code = main(["validate", str(_recipe_file(tmp_path, cls_recipe))])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 problems" in err
    assert "stages[0].rnak: unknown key; did you mean 'rank'?" in err
    assert "stages[1].lr: must be > 0 (got 0)" in err
    assert "stages[2].dropout: must be < 1 (got 1.5)" in err


def test_validate_ok(tmp_path, cls_recipe, capsys):
    cls_recipe["stages"] = [{"type": "finetune"}]
    assert main(["validate", str(_recipe_file(tmp_path, cls_recipe))]) == 0
    assert "ok (1 stage(s): finetune)" in capsys.readouterr().out


def test_stages_lists_fields_defaults_and_help(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    assert "finetune:" in out
    assert "rank: int (default 8) LoRA rank r." in out
    # The finetune methods are a method family: each listed with its summary and its own fields.
    assert "method: str (default 'lora')" in out
    assert all(f"  method: {m} -- " in out for m in ("lora", "dora", "qlora", "full", "ia3", "prompt-tuning"))


def test_run_bad_recipe_exits_2_and_writes_nothing(tmp_path, cls_recipe, capsys):
    cls_recipe["data"]["text_column"] = "tweet"
    code = main(["run", str(_recipe_file(tmp_path, cls_recipe)), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.text_column: column 'tweet' is not in split 'train'")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_run_with_overrides_and_resume(tmp_path, cls_recipe, capsys):
    cls_recipe["stages"] = [{"type": "finetune", "method": "full", "max_steps": 2, "batch_size": 8}]
    path = _recipe_file(tmp_path, cls_recipe)
    assert main(["run", str(path), "stages[0].lr=0.01", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["recipe"]["stages"][0]["lr"] == 0.01
    assert main(["run", str(path), "stages[0].lr=0.01", "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", str(path), "stages[0].lr=0.01", "--resume", "--quiet"]) == 0


def test_python_tag_recipe_exits_2(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    assert main(["run", str(path)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_stages_lists_every_stage_and_method_in_a_fresh_process():
    """`compress` imports lazily: the first thing a fresh process asks the registry must still see
    the built-in stages (an empty listing went unnoticed while every in-process test had them loaded)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "compress.cli", "stages"], capture_output=True, text=True,
                         check=True).stdout
    for line in ("prune: ", "quantize: ", "finetune: ", "structure: n:m -- ", "allocation: "):
        assert line in out, line


def test_abbreviated_flags_are_refused_not_guessed(tmp_path, cls_recipe, capsys):
    """`--over` must not silently mean --overwrite (which replaces a run folder)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cls_recipe))
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--over"])
    assert exit_.value.code == 2
    assert "--over" in capsys.readouterr().err
