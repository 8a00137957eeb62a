"""Hostile input, through the command line as a user types it: each case exits with its documented
code (2: bad input), names the recipe field and the fix, never prints a traceback, and — for a
pre-flight check — writes nothing (no run folder)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from compress import preflight, testing
from compress.cli import main


def _file(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(capsys, tmp_path: Path, recipe: dict, *args: str) -> tuple[int, str]:
    code = main(["run", str(_file(tmp_path, recipe)), "--quiet", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _refused(capsys, tmp_path: Path, recipe: dict, *args: str) -> str:
    """Run, expect exit 2 with nothing written; return the message."""
    code, err = _run(capsys, tmp_path, recipe, *args)
    assert code == 2, err
    assert not Path(recipe["output_dir"]).exists(), "a pre-flight refusal must not create the run folder"
    return err


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _relabel(tmp_path: Path, labels: list, name: str = "d.csv", n: int = 60) -> str:
    rows = testing.sentiment_rows(n)
    return str(_csv(tmp_path / name, [{"text": r["text"], "label": labels[i % len(labels)]}
                                      for i, r in enumerate(rows)]))


# ------------------------------------------------------------------ sequence lengths against positions


def test_eval_seq_len_above_the_models_positions(capsys, tmp_path, cls_recipe):
    cls_recipe["eval"]["seq_len"] = 129  # tiny BERT has 128 learned positions
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "eval.seq_len: 129 tokens is more than the model's 128 positions (max_position_embeddings" in err
    assert "use eval.seq_len: 128 or less" in err


def test_max_length_above_the_models_positions_for_a_causal_lm(capsys, tmp_path, lm_recipe):
    lm_recipe["data"]["max_length"] = 300  # tiny Llama: 256
    err = _refused(capsys, tmp_path, lm_recipe)
    assert "data.max_length: 300 tokens is more than the model's 256 positions" in err
    assert "use data.max_length: 256 or less" in err


def test_both_lengths_are_reported_at_once(capsys, tmp_path, cls_recipe):
    cls_recipe["eval"]["seq_len"] = 4096
    cls_recipe["data"]["max_length"] = 512
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "2 problems" in err and "data.max_length: 512" in err and "eval.seq_len: 4096" in err


def test_seq_len_is_free_when_no_speed_test_runs(cls_recipe, tiny_bert_dir):
    from transformers import AutoConfig

    from compress import load_recipe

    config = AutoConfig.from_pretrained(tiny_bert_dir)
    cls_recipe["eval"].update(seq_len=4096, speed=False)
    assert preflight.position_problems(config, load_recipe(cls_recipe)) == []
    cls_recipe["eval"]["speed"] = True
    assert len(preflight.position_problems(config, load_recipe(cls_recipe))) == 1


@pytest.mark.parametrize("model_type, usable", [("roberta", 128), ("gpt2", 256), ("bert", 128), ("opt", 256)])
def test_usable_positions_per_architecture(model_type, usable):
    from transformers import AutoConfig

    _, fields = testing.TINY_ARCHITECTURES[model_type]
    pad = {"roberta": 1}.get(model_type, 0)  # RoBERTa counts positions from pad_token_id + 1
    config = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=pad,
                                  **{k: v for k, v in fields.items() if v is not None})
    assert preflight.max_positions(config)[0] == usable


# ------------------------------------------------------------------ values that validate but cannot run


@pytest.mark.parametrize("override, needle", [
    ("seed=4294967296", "seed: must be <= 4294967295"),
    ("seed=-1", "seed: must be >= 0"),
    ("data.eval_size=.inf", "data.eval_size: input should be a finite number"),
    ("data.eval_size=.nan", "data.eval_size: input should be a finite number"),
    ("data.eval_size=1.5", "data.eval_size: 1.5 is neither a share"),
])
def test_values_that_cannot_run_are_refused(capsys, tmp_path, cls_recipe, override, needle):
    err = _refused(capsys, tmp_path, cls_recipe, override)
    assert needle in err


@pytest.mark.parametrize("override", ["eval.repeats=1000000", "eval.warmup=1000000"])
def test_speed_test_counts_are_bounded(capsys, tmp_path, cls_recipe, override):
    # through `validate`, so a broken bound shows as a failed test rather than days of timing
    assert main(["validate", str(_file(tmp_path, cls_recipe)), "--set", override]) == 2
    assert f"{override.split('=')[0]}: must be <= 1000 (got 1000000)" in capsys.readouterr().err


def test_the_last_stage_seed_must_fit_too(capsys, tmp_path, cls_recipe):
    # stage i is seeded with seed + i + 1: 2**32 - 1 plus one stage is past numpy's limit
    cls_recipe["stages"] = [{"type": "finetune", "max_steps": 1}]
    err = _refused(capsys, tmp_path, cls_recipe, "seed=4294967295")
    assert "seed: stage 1 runs with seed + 1" in err and "use a seed <= 4294967294" in err


# ------------------------------------------------------------------ memory and absurd configs


def test_a_model_larger_than_memory_is_refused_with_the_numbers(capsys, tmp_path, cls_recipe, monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_ENV, raising=False)
    monkeypatch.setattr(preflight, "available_memory", lambda device: 10_000)
    cls_recipe["eval"].update(eval_batch_size=1, speed=False)  # so the weights are the largest share
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "model.path: this run needs at least" in err
    assert "parameters × 4 bytes (float32)" in err and "available" in err
    assert f"set {preflight.SKIP_MEMORY_ENV}=1 to run anyway" in err


def test_a_batch_too_large_for_memory_names_the_batch(capsys, tmp_path, lm_recipe, monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_ENV, raising=False)
    lm_recipe["eval"].update(batch_size=100_000, seq_len=256)  # logits alone: 100k x 256 x vocab x 4 bytes
    err = _refused(capsys, tmp_path, lm_recipe)
    assert "eval.batch_size: this run needs at least" in err and "GiB available" in err


def test_the_memory_check_can_be_overridden(cls_recipe, tiny_bert_dir, monkeypatch):
    from transformers import AutoConfig

    from compress import load_recipe

    recipe, config = load_recipe(cls_recipe), AutoConfig.from_pretrained(tiny_bert_dir)
    monkeypatch.setattr(preflight, "available_memory", lambda device: 10_000)
    with pytest.raises(preflight.MemoryCheckError):
        preflight.check_memory(config, recipe, "sequence-classification", "cpu", [])
    monkeypatch.setenv(preflight.SKIP_MEMORY_ENV, "1")
    preflight.check_memory(config, recipe, "sequence-classification", "cpu", [])


def test_on_cuda_the_gpus_free_memory_is_the_limit(cls_recipe, tiny_bert_dir, monkeypatch):
    import torch
    from transformers import AutoConfig

    from compress import load_recipe

    monkeypatch.delenv(preflight.SKIP_MEMORY_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (50_000, 80 * 2**30))
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    with pytest.raises(preflight.MemoryCheckError, match="but the GPU has 48.8 KiB available"):
        preflight.check_memory(config, load_recipe(cls_recipe), "sequence-classification", "cuda", [])


def test_a_student_too_large_for_memory_is_refused_before_building(capsys, tmp_path, cls_recipe, monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_ENV, raising=False)
    monkeypatch.setattr(preflight, "available_memory", lambda device: 2**30)
    cls_recipe["stages"] = [{"type": "distill", "max_steps": 1, "student_config": {
        "hidden_size": 4096, "intermediate_size": 16384, "num_attention_heads": 32, "num_hidden_layers": 24}}]
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "the distill student:" in err and "but this machine has 1.0 GiB available" in err


def test_an_absurd_layer_count_is_refused_at_once(capsys, tmp_path, cls_recipe):
    cls_recipe["stages"] = [{"type": "distill", "max_steps": 1, "student_config": {"num_hidden_layers": 100000}}]
    started = time.perf_counter()
    err = _refused(capsys, tmp_path, cls_recipe)
    assert time.perf_counter() - started < 60  # it used to build 100,000 layers for minutes
    assert "stages[0].student_config: num_hidden_layers: 100000 is beyond any trained model" in err


def test_parameter_estimate_matches_the_built_model(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.num_hidden_layers = 5
    built = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert preflight.estimate_parameters(config, "causal-lm") == built
    bert = AutoConfig.from_pretrained(testing.make_tiny_bert(tmp_path / "b", num_hidden_layers=3))
    built = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(bert).parameters())
    assert preflight.estimate_parameters(bert, "sequence-classification") == built


def test_an_absurd_hidden_size_is_refused_by_the_real_memory_check(capsys, tmp_path, cls_recipe, monkeypatch):
    # no monkeypatched memory: 10**7 x 10**7 weights per matrix exceed any machine
    monkeypatch.delenv(preflight.SKIP_MEMORY_ENV, raising=False)
    cls_recipe["stages"] = [{"type": "distill", "max_steps": 1, "student_config": {
        "hidden_size": 10**7, "intermediate_size": 10**7, "num_attention_heads": 1}}]
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "stages[0].student_config: this run needs at least" in err and "the distill student:" in err


# ------------------------------------------------------------------ labels


def test_labels_mixing_ids_and_names(capsys, tmp_path, cls_recipe):
    rows = testing.sentiment_rows(60)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"text": r["text"], "label": i % 3 if i % 2 else r["label"]})
                              for i, r in enumerate(rows)))
    cls_recipe["data"]["source"] = str(path)
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "data.label_column: column 'label' mixes numbers (0, 1, 2) and names (negative, neutral" in err
    assert "use one kind for every row" in err


def test_a_single_class_is_refused_not_trained_as_regression(capsys, tmp_path, cls_recipe, tiny_bert_dir):
    base = tmp_path / "encoder"  # a model without a trained head: today this silently ran as regression
    shutil.copytree(tiny_bert_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    cls_recipe["model"]["path"] = str(base)
    cls_recipe["data"]["source"] = _relabel(tmp_path, ["positive"])
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "data.label_column: column 'label' holds a single class ('positive') in 60 row(s)" in err
    assert "needs at least 2" in err


def test_class_count_against_a_trained_head_names_the_data_not_model_path(capsys, tmp_path, cls_recipe):
    cls_recipe["data"]["source"] = _relabel(tmp_path, [f"c{i}" for i in range(5)])
    err = _refused(capsys, tmp_path, cls_recipe)
    assert ("error: data.label_column 'label': 5 classes (c0, c1, c2, c3, c4), but model.path's classifier head "
            "was trained for 3") in err
    assert "report above" not in err and "ignore_mismatched_sizes" not in err
    assert "use data with the head's 3 classes, or start from a model without a classification head" in err


def test_num_labels_against_a_trained_head(capsys, tmp_path, cls_recipe):
    err = _refused(capsys, tmp_path, cls_recipe, "model.num_labels=4")
    assert "model.num_labels: 4, but model.path's classifier head was trained for 3" in err
    assert "drop model.num_labels" in err
    err = _refused(capsys, tmp_path, cls_recipe, "model.num_labels=2")
    assert "model.num_labels: 2 is fewer than the 3 labels in the data" in err


def test_a_single_huge_label_id_is_refused_fast(capsys, tmp_path, cls_recipe):
    cls_recipe["data"]["source"] = _relabel(tmp_path, [0, 1, 10**12])
    started = time.perf_counter()
    err = _refused(capsys, tmp_path, cls_recipe)
    assert time.perf_counter() - started < 60  # it used to name 10**12 classes until memory ran out
    assert "data.label_column: column 'label' holds ids up to 1000000000000 but only 3 distinct ones" in err
    assert "renumber them" in err


@pytest.mark.parametrize("labels, needle", [
    ([-1, 0, 1], "holds negative ids (-1)"),
    ([0.5, 1.5, 2.25], "holds real numbers (e.g. 0.5)"),
    ([0, "neutral", "positive"], "mixes numbers (0) and names (neutral, positive)"),
])
def test_odd_label_values(capsys, tmp_path, cls_recipe, labels, needle):
    cls_recipe["data"]["source"] = _relabel(tmp_path, labels)
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "data.label_column: column 'label' " + needle in err


def test_labels_that_are_lists(capsys, tmp_path, cls_recipe):
    rows = testing.sentiment_rows(60)
    path = tmp_path / "lists.jsonl"
    path.write_text("\n".join(json.dumps({"text": r["text"], "label": [i % 3] if i % 2 else i % 3})
                              for i, r in enumerate(rows)))
    cls_recipe["data"]["source"] = str(path)
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "data.label_column: column 'label' holds values that are not labels (e.g. [1])" in err


def test_an_id_column_used_as_labels(capsys, tmp_path, cls_recipe):
    cls_recipe["data"]["source"] = _relabel(tmp_path, [f"row{i}" for i in range(300)], n=300)
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "has 300 distinct values in 300 rows, which looks like an id or text column" in err


def test_a_numeric_text_column(capsys, tmp_path, cls_recipe):
    rows = testing.sentiment_rows(60)
    cls_recipe["data"]["source"] = str(_csv(tmp_path / "n.csv", [{"text": i, "words": r["text"], "label": r["label"]}
                                                                  for i, r in enumerate(rows)]))
    err = _refused(capsys, tmp_path, cls_recipe)
    assert "data.text_column: column 'text' of split 'train' holds int64 values, not text" in err
    assert "set data.text_column to the column with the text (text columns: words" in err


def test_one_row_of_data(capsys, tmp_path, lm_recipe):
    (tmp_path / "one.txt").write_text("the big cats run . my dogs eat very good .\n")
    lm_recipe["data"]["source"] = str(tmp_path / "one.txt")
    err = _refused(capsys, tmp_path, lm_recipe)
    assert "data.source:" in err and "has 1 usable row" in err and "needs at least 2" in err


def test_a_share_that_leaves_nothing_to_train_on(capsys, tmp_path, cls_recipe):
    cls_recipe["data"]["source"] = _relabel(tmp_path, ["a", "b"], n=4)
    err = _refused(capsys, tmp_path, cls_recipe, "data.eval_size=0.9")
    assert "data.eval_size: a share of 0.9 of 4 rows leaves nothing to train on" in err


# ------------------------------------------------------------------ model files


def test_a_truncated_gguf_file_says_what_is_wrong(capsys, tmp_path, lm_recipe):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    whole = tmp_path / "whole.gguf"
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((64, 1000), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = whole.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])  # an interrupted download
    err = _refused(capsys, tmp_path, lm_recipe, f"model.path={tmp_path / 'cut.gguf'}")
    assert "model.path:" in err and "cut.gguf' is not a readable GGUF file" in err
    assert "truncated or damaged — download it again" in err
    assert "must hold a config.json" not in err


def test_a_damaged_gguf_named_by_gguf_file_blames_that_field(capsys, tmp_path, lm_recipe):
    pytest.importorskip("gguf")
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "m.Q8_0.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    err = _refused(capsys, tmp_path, lm_recipe, f"model.path={folder}", "model.gguf_file=m.Q8_0.gguf")
    assert "model.gguf_file:" in err and "m.Q8_0.gguf' is not a readable GGUF file" in err


@pytest.mark.parametrize("content, needle", [
    (b"", "it is empty"),
    (b"PK\x03\x04 a zip, not a model", "does not start with the GGUF signature"),
])
def test_a_file_that_is_not_gguf(capsys, tmp_path, lm_recipe, content, needle):
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(content)
    err = _refused(capsys, tmp_path, lm_recipe, f"model.path={tmp_path / 'm.gguf'}")
    assert needle in err and "download it again" in err


def test_model_path_that_is_a_plain_file(capsys, tmp_path, lm_recipe):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    err = _refused(capsys, tmp_path, lm_recipe, f"model.path={tmp_path / 'weights.safetensors'}")
    assert "is a file; give the model's folder (with config.json), or a .gguf file" in err


def test_an_unreadable_config_json(capsys, tmp_path, lm_recipe, tiny_llama_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama", ')
    err = _refused(capsys, tmp_path, lm_recipe, f"model.path={broken}")
    assert "its config.json cannot be read" in err


# ------------------------------------------------------------------ overrides and recipe files


@pytest.mark.parametrize("key", [".", "a..b", "[0]", "a b", "stages[x]", "seed.", "0.seed"])
def test_override_keys_that_are_not_paths(capsys, tmp_path, cls_recipe, key):
    err = _refused(capsys, tmp_path, cls_recipe, f"{key}=1")
    assert "not a field path; write it like seed, data.max_length, stages[0].lr" in err


def test_an_alias_bomb_in_an_override_is_refused_fast(capsys, tmp_path, cls_recipe):
    levels = ["&a0 [x, x, x, x, x, x, x]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 7) + "]" for i in range(1, 14)]
    started = time.perf_counter()
    err = _refused(capsys, tmp_path, cls_recipe, "description=[" + ", ".join(levels) + "]")
    assert time.perf_counter() - started < 10
    assert "override description: line 1: the aliases (*name) expand to more than 100,000 values" in err


def test_an_alias_bomb_under_the_alias_count_in_a_recipe_file(tmp_path):
    # 13 levels x 7 aliases = 91 aliases (under the count limit) but 7**13 values once expanded
    lines = ["a0: &a0 [x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 7) + "]" for i in range(1, 14)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines))
    started = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system [echo hi]", "!custom x",
                                   "!!python/name:os.system"])
def test_tags_in_an_override_are_refused(capsys, tmp_path, cls_recipe, value):
    err = _refused(capsys, tmp_path, cls_recipe, f"description={value}")
    assert "override description:" in err and "tags such as !!python/... are refused" in err


def test_overrides_after_flags_are_applied(capsys, tmp_path, cls_recipe):
    # the override comes after --overwrite: if it were dropped, this run would start and succeed
    err = _refused(capsys, tmp_path, cls_recipe, "--overwrite", "eval.seq_len=999")
    assert "eval.seq_len: 999 tokens" in err


def test_stray_arguments_after_flags_are_still_an_error(capsys, tmp_path, cls_recipe):
    with pytest.raises(SystemExit) as info:
        main(["run", str(_file(tmp_path, cls_recipe)), "--quiet", "not-an-override"])
    assert info.value.code == 2
    assert "not-an-override" in capsys.readouterr().err


@pytest.mark.parametrize("raw, needle", [
    ("name: caf\u00e9\n".encode("latin-1"), "line 1: byte 0xe9 at offset 9 is not UTF-8"),
    ("name: x\n".encode("utf-16"), "the file is UTF-16 text"),
])
def test_recipe_files_that_are_not_utf8(capsys, tmp_path, raw, needle):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and needle in err and "save it as UTF-8" in err


def test_a_utf8_byte_order_mark_is_fine(capsys, tmp_path, cls_recipe):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(cls_recipe).encode())
    assert main(["validate", str(path)]) == 0


def test_a_folder_given_as_the_recipe(capsys, tmp_path):
    assert main(["validate", str(tmp_path)]) == 2
    assert "is a folder; give the recipe's .yaml file" in capsys.readouterr().err


# ------------------------------------------------------------------ the console


def test_library_chatter_stays_off_the_console_and_reaches_debug(capsys):
    import logging
    import warnings

    import transformers

    from compress.cli import _setup_logging

    logging.captureWarnings(False)  # an earlier test's setup: start from Python's default
    _setup_logging(False)
    records: list[str] = []
    listener = logging.Handler(logging.DEBUG)
    listener.emit = lambda record: records.append(record.getMessage())  # a run's log file, say
    logging.getLogger("compress").addHandler(listener)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(True)
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
            transformers.utils.logging.get_logger("transformers.modeling_utils").warning("Some weights were not used")
            logging.getLogger("compress").info("stage 1/1: finetune")
    finally:
        logging.getLogger("compress").removeHandler(listener)
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert err.strip() == "compress: stage 1/1: finetune"
    assert any(m.startswith("bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward") for m in records)
    assert any("py.warnings:" in m and "is_gradient_checkpointing" in m for m in records)
    assert any(m == "transformers.modeling_utils: Some weights were not used" for m in records)
    assert not transformers.utils.logging.is_progress_bar_enabled()  # "Loading weights", "Writing model shards"


def test_debug_shows_the_library_messages_on_the_console(capsys):
    import logging

    from compress.cli import _setup_logging

    _setup_logging(False, debug=True)
    try:
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        err = capsys.readouterr().err
        assert "compress: bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward" in err
    finally:
        _setup_logging(False)
