"""The runner: checks everything cheap first, then baseline -> stages -> eval points -> report.

Each stage's output goes to `<output>/NN-<type>/` (written atomically); `stage.json` inside marks
it complete and carries a fingerprint of everything that produced it, which is what `resume`
compares. `run.json` (the manifest) and `report.json` are rewritten after every step, so a
crash leaves an accurate record of how far the run got.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.data import DataBundle, load_data
from compress.environment import collect_environment
from compress.errors import CompressError, Interrupted, RecipeError, RunFolderError
from compress.evaluate.point import evaluate_bundle
from compress.evaluate.side_by_side import measure_side_by_side
from compress.io import write_json_atomic
from compress.loading import load_base_model, resolve_task
from compress.ownership import MARKER, check_output_folder, clear_run_folder, read_marker, write_marker
from compress.recipe import Recipe, load_recipe
from compress.registry import get_stage
from compress.report.render import write_report
from compress.report.schema import EvalPoint, Report
from compress.runlock import RunLock
from compress.runrecords import (
    RUN_FILE,
    STAGE_FILE,
    clean_temporaries,
    file_digests,
    quiet_json,
    read_model,
    recorded_baseline,
    save_eval,
    stage_record,
    verify_files,
)

log = logging.getLogger("compress")

BASELINE_DIR = "00-baseline"


def stage_dir_name(index: int, stage_type: str) -> str:
    return f"{index + 1:02d}-{stage_type}"


def stage_fingerprints(recipe: Recipe) -> list[str]:
    """Fingerprint of stage i = hash(model, data, seed, stages[0..i] minus report-only fields)."""
    base = {"model": recipe.model.model_dump(mode="json"), "data": recipe.data.model_dump(mode="json"),
            "seed": recipe.seed}
    prints, chain = [], []
    for stage in recipe.stages:
        chain.append(stage.model_dump(mode="json", exclude={"evaluate", "name"}))
        blob = json.dumps({**base, "stages": chain}, sort_keys=True)
        prints.append(hashlib.sha256(blob.encode()).hexdigest()[:16])
    return prints


def resolve_device(recipe: Recipe) -> str:
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: 'cuda' was asked for but no CUDA GPU is visible; use device: auto or cpu")
    if recipe.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return recipe.device


class Runner:
    def __init__(self, recipe: Recipe, *, output_dir: Path | None = None, resume: bool = False,
                 overwrite: bool = False, show_progress: bool = True, stop: threading.Event | None = None,
                 stage_cache: Path | None = None):
        self.recipe = recipe
        # Shared store of finished stage folders keyed by fingerprint: runs whose stages share a
        # prefix (autotune candidates) reuse those outputs instead of recomputing them.
        self.stage_cache = Path(stage_cache) if stage_cache else None
        self.cache_hits = 0
        self.stop = stop or threading.Event()
        self.current_stage: str | None = None
        self.current_index: int | None = None
        self.out = Path(output_dir) if output_dir else recipe.resolved_output_dir()
        self.resume = resume
        self.overwrite = overwrite
        self.show_progress = show_progress
        self.fingerprints = stage_fingerprints(recipe)
        self.manifest: dict[str, Any] = {}
        self.report: Report | None = None

    # ------------------------------------------------------------------ bookkeeping

    def _write_manifest(self, **changes: Any) -> None:
        self.manifest.update(changes)
        self._check_folder_kept()
        write_json_atomic(self.out / RUN_FILE, self.manifest)

    def _write_report(self, plots: bool = True) -> None:
        assert self.report is not None
        self._check_folder_kept()
        write_report(self.report, self.out, plots=plots)

    def _check_folder_kept(self) -> None:
        """The writers create missing parents: without this, a run folder deleted mid-run would be
        silently re-created, unmarked and unlocked, holding half a run."""
        if not (self.out / MARKER).is_file():
            raise FolderVanished(f"the output folder {str(self.out)!r} was deleted or emptied during the run; "
                                 f"nothing was written back into it — run the recipe again")

    def _add_point(self, point: EvalPoint) -> None:
        assert self.report is not None
        names = [p.name for p in self.report.points]
        if point.name in names:  # re-measured on resume: keep its place in the sequence
            self.report.points[names.index(point.name)] = point
        else:
            self.report.points.append(point)
        # Recipe order, so a point measured again on resume never lands after a later stage's.
        order = [BASELINE_DIR.removeprefix("00-")] + [stage_dir_name(i, s.stage_type())
                                                      for i, s in enumerate(self.recipe.stages)]
        self.report.points.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
        # The figures so far, after every point, so a killed run still leaves a report; the plots
        # (about 1.5 s of matplotlib each time) are drawn once, when the run ends or fails.
        self._write_report(plots=False)

    # ------------------------------------------------------------------ run

    def run(self) -> Report:
        # One run per folder (compress/runlock.py): a run already holding it is named at once,
        # before any checks or loading; a new folder is locked as soon as it is created.
        self.lock = RunLock(self.out)
        try:
            marker = read_marker(self.out) if self.out.is_dir() and not self.out.is_symlink() else None
            if marker and marker.get("kind") == "run":
                self.lock.acquire()
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> Report:
        recipe = self.recipe
        check_output_folder(self.out, recipe, self.resume, self.overwrite)
        self._check_resume_points()
        device = resolve_device(recipe)
        task = resolve_task(recipe.model)
        data = load_data(recipe.data, task, recipe.seed)  # cheap checks before the model loads
        # Limits the model's config sets (positions, head, memory): before weights load or folders exist.
        from compress.preflight import check_before_loading

        check_before_loading(recipe, task, data, device)
        bundle = None
        if not self.resume or not all(self._stage_done(self.out / stage_dir_name(i, s.stage_type()), i)
                                      for i, s in enumerate(recipe.stages)):
            _seed_everything(recipe.seed)
            bundle = load_base_model(recipe.model, task, data, device, recipe.seed)
            self._check_stages(bundle, data, device)  # model-dependent mistakes, before anything is written
        if self.out.exists():
            self.lock.acquire()
        if self.overwrite:
            clear_run_folder(self.out)  # only a marked run holding nothing foreign gets here
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        if read_marker(self.out) is None:
            write_marker(self.out, "run")
        clean_temporaries(self.out, {p.parent.name for p in self.out.glob(f"*/{STAGE_FILE}")})

        env = collect_environment()
        previous = self._previous_manifest()
        self.manifest = {
            "schema": 1,
            "name": recipe.name,
            "status": "running",
            "started": previous.get("started") or _now(),
            "seed": recipe.seed,
            "device": device,
            "recipe": recipe.to_dict(),
            "environment": env.model_dump(),
            "stages": [s for s in previous.get("stages") or [] if isinstance(s, dict)]
            if isinstance(previous.get("stages"), list) else [],
        }
        self.report = self._previous_report() or Report(
            name=recipe.name, created=_now(), seed=recipe.seed, recipe=recipe.to_dict(), environment=env)
        self.report.status, self.report.error = "running", None
        self._write_manifest()
        try:
            self._run_all(task, data, device, bundle)
            measure_side_by_side(self.report, recipe, self.out, task, data, device)
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
            wrapped = self._explain(exc)
            shown = wrapped or exc
            message = str(shown) if isinstance(shown, CompressError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, Exception) and wrapped is None and not isinstance(exc, CompressError):
                # An unexpected exception (a bug): the Python API re-raises it unchanged; the record
                # and the CLI (compress/cli.py) name where it happened and point to --debug.
                exc.compress_where = self._where()  # type: ignore[attr-defined]
                message = f"internal error in {exc.compress_where}: {message}"  # type: ignore[attr-defined]
            self.report.status, self.report.error = status, message
            self.report.failed_stage = self.current_stage
            try:  # the disk may still be full: recording the failure must not hide it
                self._write_report()
                self._write_manifest(status=status, error=message, failed_stage=self.current_stage,
                                     finished=_now())
            except FolderVanished:
                pass
            except OSError as write_error:
                log.error("could not record the failure in %s: %s", self.out, write_error)
            if wrapped is not None:
                raise wrapped from exc
            raise
        self.report.status = "complete"
        if recipe.goals:
            from compress.goals import evaluate_goals

            self.report.goals = evaluate_goals(self.report, recipe.goals, recipe.eval.batch_size)
        self._write_report()
        self._write_manifest(status="complete", finished=_now())
        return self.report

    def _explain(self, exc: BaseException) -> CompressError | None:
        """A CompressError (with its exit code) for a failure that is not one, naming where it happened."""
        if isinstance(exc, (CompressError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            return None
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return CompressError(f"disk full while writing into {str(self.out)!r} ({exc}); finished stages "
                                 f"are intact; free some space and rerun with --resume")
        if isinstance(exc, OSError) and not self.out.is_dir():
            return CompressError(f"the output folder {str(self.out)!r} vanished during the run ({exc}); "
                                 f"nothing can be resumed from it — run again")
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return CompressError(f"cannot write into {str(self.out)!r} ({exc}); make it writable and rerun with "
                                 f"--resume (finished stages are intact)")
        return None

    def _where(self) -> str:
        index = self.current_index if self.current_stage else None
        if index is None:
            return "the run (baseline evaluation or run records)"
        return f"stages[{index}] ({self.recipe.stages[index].stage_type()})"

    def _run_all(self, task: str, data: DataBundle, device: str, bundle: ModelBundle | None) -> None:
        recipe = self.recipe
        reference = None

        baseline_dir = self.out / BASELINE_DIR
        if recipe.eval.baseline:
            self._restore_from_cache(baseline_dir, None)
            previous = recorded_baseline(baseline_dir) if self.resume or self.stage_cache else None
            if previous is not None:
                point, reference = previous
                self._add_point(point)
            else:
                bundle = bundle or load_base_model(recipe.model, task, data, device, recipe.seed)
                log.info("evaluating baseline")
                point, reference = evaluate_bundle(bundle, "baseline", recipe.eval, data=data, device=device,
                                                   seed=recipe.seed)
                save_eval(baseline_dir, point, reference)
                self._add_point(point)
                self._store_in_cache(baseline_dir, None)

        last_dir: Path | None = None
        rerun = False  # once a stage runs again, every later stage must too: its input changed
        for index, stage in enumerate(recipe.stages):
            # (A skipped stage drops the in-memory bundle; the next run loads the last output.)
            entry = get_stage(stage.stage_type())
            folder = self.out / stage_dir_name(index, entry.type)
            if self.stop.is_set():
                raise Interrupted(f"interrupted before stage {index + 1} ({entry.type}); finished stages are "
                                  f"kept — rerun with --resume to continue")
            if not rerun and self._restore_from_cache(folder, index):
                log.info("stage %d (%s): reused from the stage cache", index + 1, entry.type)
            if (self.resume or self.stage_cache) and not rerun and self._stage_done(folder, index, verify=True):
                log.info("stage %d (%s): unchanged since the last run, skipped", index + 1, entry.type)
                record = quiet_json(folder / STAGE_FILE) or {}
                # Re-listed, so a lost or damaged run.json is rebuilt from the stage records.
                self.manifest["stages"] = [s for s in self.manifest["stages"] if s.get("index") != index] + [record]
                bundle = None
                if stage.evaluate and recipe.eval.after_each_stage:
                    # A stage is finished only with its eval point on disk: a kill between stage.json
                    # and eval.json, or a damaged eval.json, means measuring it again now.
                    point = read_model(folder / "eval.json", EvalPoint, "this eval point is measured again")
                    if point is None:
                        self.current_stage, self.current_index = folder.name, index
                        bundle = ModelBundle.load(folder, device=device)
                        point = self._evaluate_stage(bundle, folder, stage, data, device, reference,
                                                     record.get("seconds"))
                        self.current_stage = None
                    self._add_point(point)
                last_dir = folder
                continue
            if bundle is None:
                bundle = (ModelBundle.load(last_dir, device=device) if last_dir
                          else load_base_model(recipe.model, task, data, device, recipe.seed))
            rerun = True
            self.current_stage, self.current_index = folder.name, index
            ctx = self._context(index, data, device)
            log.info("stage %d/%d: %s", index + 1, len(recipe.stages), stage.label())
            _seed_everything(ctx.seed)
            started = time.perf_counter()
            bundle.info.pop("last_stage", None)
            bundle = entry.run(bundle, stage, ctx)
            seconds = round(time.perf_counter() - started, 3)
            self._check_folder_kept()
            bundle.save(folder)
            _fault("after_stage_save")
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
            record = {"index": index, "type": entry.type, "dir": folder.name, "seconds": seconds,
                      "fingerprint": self.fingerprints[index], "finished": _now(), "files": file_digests(folder)}
            write_json_atomic(folder / STAGE_FILE, record)
            _fault("after_stage_json")
            self.manifest["stages"] = [s for s in self.manifest["stages"] if s.get("index") != index] + [record]
            self._write_manifest()
            last_dir = folder
            if stage.evaluate and recipe.eval.after_each_stage:
                self._add_point(self._evaluate_stage(bundle, folder, stage, data, device, reference, seconds))
            self._store_in_cache(folder, index)
            self.current_stage = None

    def _evaluate_stage(self, bundle: ModelBundle, folder: Path, stage: Any, data: DataBundle, device: str,
                        reference: torch.Tensor | None, seconds: float | None) -> EvalPoint:
        log.info("evaluating after %s", stage.label())
        point, _ = evaluate_bundle(bundle, folder.name, self.recipe.eval, data=data, device=device,
                                   seed=self.recipe.seed, saved_dir=folder, reference=reference)
        point.stage_type = stage.stage_type()
        point.stage_seconds = seconds
        point.stage_info = bundle.info.get("last_stage", {})
        write_json_atomic(folder / "eval.json", point.model_dump(mode="json"))
        _fault("after_eval_json")
        return point

    def _context(self, index: int, data: DataBundle, device: str) -> RunContext:
        folder = self.out / stage_dir_name(index, self.recipe.stages[index].stage_type())
        return RunContext(output_dir=self.out, seed=self.recipe.seed + index + 1, device=device,
                          recipe=self.recipe, data=data, work_dir=self.out / f".work-{folder.name}",
                          resume=self.resume, show_progress=self.show_progress, logger=log, stop=self.stop)

    def _check_stages(self, bundle: ModelBundle, data: DataBundle, device: str) -> None:
        """Run every stage's model-dependent check before any work; report all problems at once."""
        problems = []
        for index, stage in enumerate(self.recipe.stages):
            entry = get_stage(stage.stage_type())
            if entry.check is not None:
                problems += [f"stages[{index}].{p}" for p in entry.check(bundle, stage,
                                                                         self._context(index, data, device))]
        if problems:
            raise RecipeError(problems)

    # ------------------------------------------------------------------ resume

    def _cache_key(self, index: int | None) -> str:
        if index is not None:
            return self.fingerprints[index]
        blob = json.dumps({"model": self.recipe.model.model_dump(mode="json"), "seed": self.recipe.seed,
                           "data": self.recipe.data.model_dump(mode="json"),
                           "eval": self.recipe.eval.model_dump(mode="json")}, sort_keys=True)
        return "baseline-" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _restore_from_cache(self, folder: Path, index: int | None) -> bool:
        if self.stage_cache is None or folder.exists():
            return False
        cached = self.stage_cache / self._cache_key(index)
        if not (cached / ("eval.json" if index is None else STAGE_FILE)).exists():
            return False
        # Hard links: no copy of the weights, and the cache entry stays intact if this folder is removed.
        shutil.copytree(cached, folder, copy_function=_link_or_copy)
        self.cache_hits += index is not None
        return True

    def _store_in_cache(self, folder: Path, index: int | None) -> None:
        if self.stage_cache is None:
            return
        target = self.stage_cache / self._cache_key(index)
        if not target.exists():
            self.stage_cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp, copy_function=_link_or_copy)
            tmp.rename(target)

    def _previous_manifest(self) -> dict[str, Any]:
        if not self.resume:
            return {}
        previous = quiet_json(self.out / RUN_FILE) or {}  # damage was said by check_output_folder
        return previous if isinstance(previous.get("name"), str) else {}

    def _previous_report(self) -> Report | None:
        if not self.resume:
            return None
        return read_model(self.out / "report.json", Report, "it is rebuilt from the eval points on disk")

    def _stage_done(self, folder: Path, index: int, verify: bool = False) -> bool:
        """Finished with the same fingerprint; with `verify`, every output file is intact too."""
        record_path = folder / STAGE_FILE
        if not record_path.exists():
            return False
        if folder.is_symlink():
            raise RunFolderError(f"{folder} is a symbolic link; stage folders must be real folders")
        record = stage_record(record_path, f"stage {index + 1} runs again" if verify else None)
        if record is None or record["fingerprint"] != self.fingerprints[index]:
            return False
        if verify:
            problem = verify_files(folder, record["files"])
            if problem:
                log.warning("%s: %s; stage %d runs again", folder.name, problem, index + 1)
                return False
        return True

    def _check_resume_points(self) -> None:
        """With --resume, refuse when a completed stage's config or inputs changed since it ran."""
        if not self.resume:
            return
        for index, stage in enumerate(self.recipe.stages):
            folder = self.out / stage_dir_name(index, stage.stage_type())
            record = stage_record(folder / STAGE_FILE)
            if record is None:  # not finished, or damaged (said, and re-run, when the stage is reached)
                break
            if record["fingerprint"] != self.fingerprints[index]:
                old = (quiet_json(self.out / RUN_FILE) or {}).get("recipe", {})
                changed = _describe_change(old, self.recipe.to_dict(), index)
                raise RunFolderError(
                    f"cannot resume: stage {index + 1} ({stage.stage_type()}) or its inputs changed since "
                    f"{folder.name} was written ({changed}); pass --overwrite to start again, "
                    f"or restore the recipe"
                )


class FolderVanished(CompressError):
    """The run folder disappeared while the run was writing into it."""

    exit_code = 1


def _describe_change(old: dict[str, Any], new: dict[str, Any], index: int) -> str:
    diffs = []
    old = old if isinstance(old, dict) else {}  # from a run.json that may be damaged
    for key in ("model", "data", "seed"):
        if old.get(key) != new.get(key):
            diffs.append(key)
    old_stages, new_stages = old.get("stages", []), new.get("stages", [])
    old_stages = old_stages if isinstance(old_stages, list) else []
    for i in range(index + 1):
        a = old_stages[i] if i < len(old_stages) and isinstance(old_stages[i], dict) else {}
        b = new_stages[i] if i < len(new_stages) else {}
        for field in sorted(set(a) | set(b)):
            if field not in ("evaluate", "name") and a.get(field) != b.get(field):
                diffs.append(f"stages[{i}].{field}: {a.get(field)!r} -> {b.get(field)!r}")
    return "; ".join(diffs) or "fingerprint differs"


def _link_or_copy(src: str, dst: str) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fault(point: str) -> None:
    """Fault injection for the kill-timing tests (tests/test_nothing_lost.py): COMPRESS_FAULT=<point>
    kills this process with SIGKILL (nothing runs after it) at that point of the first stage that
    reaches it: after_stage_save (output saved, no stage.json), after_stage_json (no eval.json yet),
    after_eval_json (eval.json written, report.json not yet updated)."""
    if os.environ.get("COMPRESS_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run(
    recipe: str | Path | dict[str, Any] | Recipe,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    stop: threading.Event | None = None,
) -> Report:
    """Run a recipe (path, dict or Recipe) and return its Report. Raises CompressError subclasses.

    Setting `stop` (e.g. from a signal handler) ends the run at the next step or stage boundary
    with `Interrupted`, after saving what is needed to `--resume`.
    """
    resolved = load_recipe(recipe, overrides)
    runner = Runner(resolved, output_dir=Path(output_dir) if output_dir else None, resume=resume,
                    overwrite=overwrite, show_progress=show_progress, stop=stop)
    report = runner.run()
    if resolved.publish and resolved.publish.push_after_run:
        from compress.hub import PublishError, push

        if not resolved.publish.repo_id:
            raise PublishError("publish.push_after_run needs publish.repo_id")
        push(runner.out, resolved.publish.repo_id, private=resolved.publish.private, spec=resolved.publish)
    return report
