"""Nothing lost, no traceback: output folders, concurrent runs, kills between files, damaged records.

Each test asserts the exit code, that the message names the problem and the fix, and that every
file already on disk is still there byte for byte.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress import registry, testing
from compress.cli import main
from compress.ownership import LOCK_FILE, MARKER
from compress.runlock import RunLock

FAST = {"type": "finetune", "method": "full", "lr": 5e-3, "max_steps": 2, "batch_size": 8}


def _snapshot(folder):
    """Every file under `folder` with its bytes (what must survive a refused command)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _recipe_file(folder, recipe):
    path = Path(folder) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def finished(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    """One finished two-stage run (read-only for tests: copy it before changing it)."""
    base = tmp_path_factory.mktemp("finished")
    recipe = testing.tiny_recipe(tiny_bert_dir, sentiment_csv, "sequence-classification", base / "run",
                                 stages=[FAST, {**FAST, "lr": 1e-3}], eval={"speed": False})
    path = _recipe_file(base, recipe)
    assert main(["run", str(path), "--quiet"]) == 0
    return path, base / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the finished run and its recipe (pointing at the copy)."""
    path, out = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    recipe = yaml.safe_load(path.read_text())
    recipe["output_dir"] = str(copy)
    return _recipe_file(tmp_path, recipe), copy


def _user_folder(tmp_path, name="mine"):
    folder = tmp_path / name
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return folder


# ------------------------------------------------------------------ output folders of compare / push / autotune


def test_compare_onto_its_own_input_run_is_refused_and_the_run_kept(finished, capsys):
    _, out = finished
    before = _snapshot(out)
    for target in (out, out / "compare", out / "01-finetune"):
        assert main(["compare", str(out), "--output", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"--output {str(target)!r}" in err and "choose" in err and "nothing was touched" in err
        assert "Traceback" not in err
    assert _snapshot(out) == before


def test_compare_refuses_a_user_folder_a_file_and_another_run(finished, tmp_path, capsys):
    _, out = finished
    mine = _user_folder(tmp_path)
    kept = _snapshot(mine)
    assert main(["compare", str(out), "--output", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "non-empty folder that compress did not create" in err and "choose a new or empty folder" in err
    assert _snapshot(mine) == kept

    a_file = tmp_path / "results.md"
    a_file.write_text("mine\n")
    assert main(["compare", str(out), "--output", str(a_file)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert a_file.read_text() == "mine\n"


def test_compare_replaces_only_its_own_folder(finished, tmp_path, capsys):
    _, out = finished
    target = tmp_path / "cmp"
    assert main(["compare", str(out), "--output", str(target)]) == 0
    assert json.loads((target / MARKER).read_text())["kind"] == "compare"
    assert main(["compare", str(out), "--output", str(target)]) == 0  # its own folder: replaced
    (target / "my-notes.md").write_text("keep me\n")
    capsys.readouterr()
    assert main(["compare", str(out), "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "holds files compress did not write (my-notes.md)" in err and "move them out" in err
    assert (target / "my-notes.md").read_text() == "keep me\n"


def test_push_dry_run_output_refuses_user_folders_and_runs(finished, run_copy, tmp_path, capsys):
    _, out = finished
    mine = _user_folder(tmp_path)
    kept, other = _snapshot(mine), _snapshot(run_copy[1])
    for target, says in ((mine, "compress did not create"), (run_copy[1], "inside the compress run folder"),
                         (out / "01-finetune", "lies inside the input")):
        assert main(["push", str(out), "--repo-id", "me/x", "--dry-run", "--output", str(target)]) == 2
        err = capsys.readouterr().err
        assert says in err and "nothing was touched" in err, err
    assert _snapshot(mine) == kept and _snapshot(run_copy[1]) == other
    # The default, the run's own publish/ folder, is compress's: written, then replaced on a second push.
    copy = run_copy[1]
    for _ in range(2):
        assert main(["push", str(copy), "--repo-id", "me/x", "--dry-run"]) == 0
        printed = capsys.readouterr().out
        assert "model.safetensors" in printed and MARKER not in printed  # the marker is never uploaded
    assert json.loads((copy / "publish" / MARKER).read_text())["kind"] == "publish"


def test_autotune_output_refuses_a_user_folder_and_its_inputs(finished, tmp_path, capsys):
    path, _ = finished
    mine = _user_folder(tmp_path)
    kept = _snapshot(mine)
    args = ["autotune", str(path), "--space", "stages[1].lr=0.001,0.002", "--budget", "accuracy_drop=0.5"]
    assert main([*args, "--output", str(mine)]) == 2
    assert "compress did not create" in capsys.readouterr().err
    assert main([*args, "--output", str(path.parent)]) == 2  # the folder holding the recipe
    assert "is or contains or lies inside the input" in capsys.readouterr().err
    assert _snapshot(mine) == kept


# ------------------------------------------------------------------ compress run --overwrite


def test_overwrite_never_replaces_another_tools_run_json(cls_recipe, tmp_path, capsys):
    out = Path(cls_recipe["output_dir"])
    out.mkdir()
    (out / "run.json").write_text('{"name": null, "tool": "other"}\n')
    (out / "results.csv").write_text("a,b\n1,2\n")
    kept = _snapshot(out)
    path = _recipe_file(tmp_path, cls_recipe)
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert main(["run", str(path), "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert "holds a run.json that compress did not write" in err and "set output_dir to a new folder" in err
        assert "--overwrite" not in err  # never suggest the flag that would not be allowed
    assert _snapshot(out) == kept


def test_overwrite_refuses_a_run_holding_user_files(run_copy, capsys):
    path, out = run_copy
    (out / "my-analysis.ipynb").write_text("{}")
    kept = _snapshot(out)
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "move them out before --overwrite" in err and "my-analysis.ipynb" in err
    assert main(["run", str(path), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds files compress did not write (my-analysis.ipynb)" in err and "move them out" in err
    assert _snapshot(out) == kept


def test_overwrite_replaces_a_compress_run(run_copy, capsys):
    path, out = run_copy
    old = (out / "01-finetune" / "stage.json").read_bytes()
    assert main(["run", str(path), "--quiet", "--overwrite"]) == 0
    assert (out / "01-finetune" / "stage.json").read_bytes() != old  # run again, not reused
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_run_from_before_the_marker_is_recognised_by_its_manifest(run_copy, capsys):
    path, out = run_copy
    (out / MARKER).unlink()  # as compress wrote run folders before the marker
    assert main(["run", str(path), "--quiet", "--resume"]) == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "run"  # adopted on its next run
    (out / MARKER).unlink()
    (out / "notes.txt").write_text("mine\n")  # ...but not once it holds anything else
    kept = _snapshot(out)
    assert main(["run", str(path), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "compress did not write" in err and "--overwrite" not in err
    assert _snapshot(out) == kept


# ------------------------------------------------------------------ one run per folder


def test_second_run_on_a_locked_folder_is_refused_naming_the_holder(run_copy, capsys):
    path, out = run_copy
    kept = _snapshot(out)
    holder = RunLock(out)  # a separate open file: flock conflicts with it as with another process
    holder.acquire()
    try:
        started = json.loads((out / LOCK_FILE).read_text())["started"]
        assert main(["run", str(path), "--quiet", "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another compress run (pid {os.getpid()}, started {started}" in err
        assert "wait for it to finish" in err
        assert _snapshot(out) == {**kept, LOCK_FILE: (out / LOCK_FILE).read_bytes()}
    finally:
        holder.release()


def test_stale_lock_of_a_dead_run_is_taken_over_and_said(run_copy, capsys):
    path, out = run_copy
    dead = subprocess.Popen(["true"])
    dead.wait()  # what a killed run leaves: the file, its lock already released by the kernel
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "started": "2026-01-01T00:00:00+00:00"}))
    assert main(["run", str(path), "--quiet", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock left by pid {dead.pid} (started 2026-01-01T00:00:00+00:00)" in err
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------ resume: whole records, damaged files


def _count_stage_runs(monkeypatch):
    entry = registry.get_stage("finetune")
    calls = []
    monkeypatch.setitem(registry._STAGES, "finetune", dataclasses.replace(
        entry, run=lambda b, c, ctx: calls.append(c.lr) or entry.run(b, c, ctx)))
    return calls


def _damage(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip_last_byte(path):
    """Still a readable file, with one changed value: only a checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("target", "says", "reruns"), [
    ("02-finetune/eval.json", "02-finetune/eval.json is damaged", []),
    ("01-finetune/stage.json", "01-finetune/stage.json is damaged", [5e-3, 1e-3]),
    ("02-finetune/stage.json:{}", "02-finetune/stage.json is damaged (fields missing", [1e-3]),
    ('run.json:{"stages": "x", "recipe": 3}', "run.json is damaged (no run name)", []),
    ("run.json", "run.json is damaged", []),
    ("report.json", "report.json is damaged", []),
    ("00-baseline/predictions.safetensors", "predictions.safetensors is truncated or changed", []),
    ("00-baseline/predictions.safetensors:flip", "predictions.safetensors is corrupted (checksum mismatch)", []),
    ("00-baseline/eval.json", "00-baseline/eval.json is damaged", []),
])
def test_damaged_records_are_named_and_what_they_describe_is_redone(run_copy, monkeypatch, capsys, target, says,
                                                                      reruns):
    path, out = run_copy
    expected = json.loads((out / "report.json").read_text())
    target, _, how = target.partition(":")
    if how == "flip":
        _flip_last_byte(out / target)
    elif how:  # valid JSON of the wrong shape
        (out / target).write_text(how)
    else:
        _damage(out / target)
    calls = _count_stage_runs(monkeypatch)
    assert main(["run", str(path), "--quiet", "--resume"]) == 0
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert ("runs again" in err) if reruns else ("measured again" in err or "rebuilt" in err), err
    assert calls == reruns
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete"
    assert [p["name"] for p in report["points"]] == [p["name"] for p in expected["points"]]
    for got, want in zip(report["points"], expected["points"], strict=True):
        assert got["accuracy"]["accuracy"] == pytest.approx(want["accuracy"]["accuracy"])
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and [s["dir"] for s in manifest["stages"]] == ["01-finetune",
                                                                                           "02-finetune"]


def test_missing_eval_point_is_measured_before_the_run_counts_as_complete(run_copy, monkeypatch):
    """The state a kill between stage.json and eval.json leaves (the slow test below makes it for real)."""
    path, out = run_copy
    (out / "02-finetune" / "eval.json").unlink()
    report = json.loads((out / "report.json").read_text())
    report["points"] = report["points"][:2]
    report["status"] = "running"
    (out / "report.json").write_text(json.dumps(report))
    calls = _count_stage_runs(monkeypatch)
    assert main(["run", str(path), "--quiet", "--resume"]) == 0
    assert calls == []  # the stage's output was whole: only its eval point was missing
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["points"]] == ["baseline", "01-finetune", "02-finetune"]
    assert report["status"] == "complete" and (out / "02-finetune" / "eval.json").exists()


def test_temporaries_left_by_a_kill_are_cleaned_on_the_next_run(run_copy, capsys):
    path, out = run_copy
    left = [out / ".run.json.tmp-0123abcd", out / "01-finetune" / ".stage.json.tmp-89abcdef",
            out / ".02-finetune.tmp-deadbeef" / "model.safetensors", out / ".work-01-finetune" / "checkpoint" / "x",
            out / "00-baseline" / ".predictions.safetensors.tmp"]
    for f in left:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half-written")
    assert main(["run", str(path), "--resume"]) == 0
    assert "removed 5 temporary file(s) left by an interrupted run" in capsys.readouterr().err
    assert not [f for f in left if f.exists()]
    assert not (out / ".02-finetune.tmp-deadbeef").exists() and not (out / ".work-01-finetune").exists()


# ------------------------------------------------------------------ failures: exit codes, no traceback


def test_unexpected_exception_in_a_stage_is_an_internal_error_naming_it(cls_recipe, tmp_path, monkeypatch, capsys):
    cls_recipe["stages"] = [FAST, {"type": "prune", "sparsity": 0.5}]
    cls_recipe["eval"]["speed"] = False
    entry = registry.get_stage("prune")

    def broken(bundle, config, ctx):
        raise ValueError("shape mismatch in layer 3")

    monkeypatch.setitem(registry._STAGES, "prune", dataclasses.replace(entry, run=broken))
    path = _recipe_file(tmp_path, cls_recipe)
    assert main(["run", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "internal error in stages[1] (prune): ValueError: shape mismatch in layer 3" in err
    assert "--debug" in err and "Traceback" not in err
    out = Path(cls_recipe["output_dir"])
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["failed_stage"] == "02-prune"
    assert "internal error in stages[1] (prune)" in manifest["error"]
    assert (out / "01-finetune" / "stage.json").exists()  # the finished stage is kept
    with pytest.raises(ValueError, match="shape mismatch"):  # --debug shows the real exception
        main(["run", str(path), "--quiet", "--resume", "--debug"])


def test_damaged_report_given_to_compare_and_push_is_a_clear_error(run_copy, capsys):
    _, out = run_copy
    _damage(out / "report.json")
    _damage(out / "run.json")
    assert main(["compare", str(out), "--output", str(out.parent / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "report.json: damaged or not a compress report" in err and "--resume" in err
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "run.json: damaged or not a compress manifest" in err and "--resume" in err


def test_sigterm_is_handled_like_ctrl_c(capsys):
    """The fast half of the SIGTERM guarantee (the slow test below sends it to a real run)."""
    from compress.cli import _graceful_sigint

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGTERM, lambda *_: None)  # if compress left SIGTERM alone, this test fails cleanly
        stop = _graceful_sigint()
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler at the next bytecode boundary
        deadline = time.time() + 5
        while not stop.is_set() and time.time() < deadline:
            time.sleep(0.01)
        assert stop.is_set()
        assert "SIGTERM: stopping at the next step boundary to save progress" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):  # a second one aborts at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


# ------------------------------------------------------------------ real processes, real signals (slow)


def _cli(recipe_path, *extra, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "compress.cli", "run", str(recipe_path), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigkill_between_stage_json_and_eval_json_then_resume(cls_recipe, tmp_path):
    cls_recipe["stages"] = [FAST, {**FAST, "lr": 1e-3}]
    cls_recipe["eval"]["speed"] = False
    path = _recipe_file(tmp_path, cls_recipe)
    out = Path(cls_recipe["output_dir"])
    proc = _cli(path, env={"COMPRESS_FAULT": "after_stage_json"})  # SIGKILLs itself after 01's stage.json
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "01-finetune" / "stage.json").exists() and not (out / "01-finetune" / "eval.json").exists()
    assert (out / LOCK_FILE).exists()  # left by the killed holder; its flock went with the process

    resumed = _cli(path, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "took over the lock left by pid" in err
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["points"]] == ["baseline", "01-finetune", "02-finetune"]
    assert report["status"] == "complete" and (out / "01-finetune" / "eval.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["after_stage_save", "after_eval_json"])
def test_sigkill_around_a_stage_record_then_resume_completes_every_point(cls_recipe, tmp_path, fault):
    cls_recipe["stages"] = [FAST, {**FAST, "lr": 1e-3}]
    cls_recipe["eval"]["speed"] = False
    path = _recipe_file(tmp_path, cls_recipe)
    out = Path(cls_recipe["output_dir"])
    proc = _cli(path, env={"COMPRESS_FAULT": fault})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "01-finetune" / "stage.json").exists() == (fault == "after_eval_json")
    resumed = _cli(path, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["points"]] == ["baseline", "01-finetune", "02-finetune"]
    assert report["status"] == "complete"
    for stage in ("01-finetune", "02-finetune"):
        assert (out / stage / "stage.json").exists() and (out / stage / "eval.json").exists()
    assert not [p.name for p in out.rglob(".*") if ".tmp" in p.name]


@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted_and_exits_130(cls_recipe, tmp_path):
    cls_recipe["stages"] = [{**FAST, "max_steps": 400, "checkpoint_every": 1}]
    cls_recipe["eval"]["speed"] = False
    path = _recipe_file(tmp_path, cls_recipe)
    out = Path(cls_recipe["output_dir"])
    proc = _cli(path)
    deadline = time.time() + 240
    while not (out / ".work-01-finetune" / "checkpoint").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM: stopping at the next step boundary" in err and "--resume" in err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"


def test_run_folder_deleted_mid_run_is_not_silently_recreated(cls_recipe, tmp_path, monkeypatch, capsys):
    cls_recipe["stages"] = [FAST]
    cls_recipe["eval"]["speed"] = False
    entry = registry.get_stage("finetune")

    def delete_folder(bundle, config, ctx):
        shutil.rmtree(ctx.output_dir)  # the user cleans up runs/ while the run is in a stage
        return bundle

    monkeypatch.setitem(registry._STAGES, "finetune", dataclasses.replace(entry, run=delete_folder))
    assert main(["run", str(_recipe_file(tmp_path, cls_recipe)), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "was deleted or emptied during the run" in err and "run the recipe again" in err
    assert "Traceback" not in err
    assert not Path(cls_recipe["output_dir"]).exists()
