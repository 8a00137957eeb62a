"""The runner: checks everything cheap first, then baseline -> stages -> eval points -> report.

Each stage's output goes to `<output>/NN-<type>/` (written atomically); `stage.json` inside marks
it complete and carries a fingerprint of everything that produced it, which is what `resume`
compares. `run.json` (the manifest) and `report.json` are rewritten after every step, so a
crash leaves an accurate record of how far the run got.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from compress.bundle import ModelBundle
from compress.context import RunContext, StageOutput
from compress.data import DataBundle, load_data
from compress.distributed import current_ranks, resolve_device
from compress.environment import collect_environment
from compress.errors import CompressError, Interrupted, RecipeError
from compress.evaluate.point import evaluate_bundle
from compress.evaluate.side_by_side import measure_side_by_side
from compress.io import write_json_atomic
from compress.loading import load_base_model, resolve_task
from compress.ownership import MARKER, check_output_folder, clear_run_folder, read_marker, write_marker
from compress.placement import plan_device_map
from compress.recipe import Recipe, load_recipe
from compress.registry import StageResult, base_load_plan, get_stage
from compress.report.render import write_report
from compress.report.schema import EvalPoint, Report
from compress.reuse import StageCache, check_resume_points, stage_dir_name, stage_done, stage_fingerprints
from compress.runfailures import FolderVanished, explain_failure
from compress.runlock import RunLock
from compress.runrecords import (
    RUN_FILE,
    STAGE_FILE,
    clean_temporaries,
    fault,
    new_stage_record,
    now,
    quiet_json,
    read_model,
    recorded_baseline,
    save_eval,
)

log = logging.getLogger("compress")

BASELINE_DIR = "00-baseline"


class Runner:
    def __init__(self, recipe: Recipe, *, output_dir: Path | None = None, resume: bool = False,
                 overwrite: bool = False, show_progress: bool = True, stop: threading.Event | None = None,
                 stage_cache: Path | None = None):
        self.recipe = recipe
        # Shared store of finished stage folders keyed by fingerprint: runs whose stages share a
        # prefix (autotune candidates) reuse those outputs instead of recomputing them.
        self.fingerprints = stage_fingerprints(recipe)
        self.device_map: dict[str, Any] | None = None  # the base's placement (model.device_map), once planned
        self.stage_cache = StageCache(stage_cache, recipe, self.fingerprints) if stage_cache else None
        self.stop = stop or threading.Event()
        self.current_stage: str | None = None
        self.current_index: int | None = None
        self.out = Path(output_dir) if output_dir else recipe.resolved_output_dir()
        self.resume = resume
        self.overwrite = overwrite
        self.show_progress = show_progress
        self.manifest: dict[str, Any] = {}
        self.report: Report | None = None
        self.ranks = current_ranks()

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
        # before any checks or loading; a new folder is locked as soon as it is created. Under a
        # distributed launch rank 0 alone touches the folder; the others follow its outcome.
        self.lock = RunLock(self.out)
        try:
            def lock_existing_run() -> None:
                marker = read_marker(self.out) if self.out.is_dir() and not self.out.is_symlink() else None
                if marker and marker.get("kind") == "run":
                    self.lock.acquire()

            self.ranks.on_main(lock_existing_run)
            report = self._run()
            return self.ranks.broadcast(report)
        finally:
            self.lock.release()

    def _run(self) -> Report:
        recipe, ranks = self.recipe, self.ranks

        def check_folder() -> None:
            check_output_folder(self.out, recipe, self.resume, self.overwrite)
            if self.resume:
                check_resume_points(self.out, self.recipe, self.fingerprints)

        ranks.on_main(check_folder)
        all_done = self.resume and ranks.on_main(lambda: all(
            stage_done(self.fingerprints, self.out / stage_dir_name(i, s.stage_type()), i) for i, s in enumerate(recipe.stages)))
        bundle = None
        try:  # every rank loads (training stages run on all of them); all agree before anything is written
            device = resolve_device(recipe.device, ranks)
            task = resolve_task(recipe.model)
            data = load_data(recipe.data, task, recipe.seed)  # cheap checks before the model loads
            # Limits the model's config sets (positions, head, memory): before weights load or folders exist.
            from compress.preflight import check_before_loading

            self.device_map = plan_device_map(recipe.model, task, device)  # before any weight is read
            check_before_loading(recipe, task, data, device, ranks.world_size, self.device_map)
            if not all_done:
                _seed_everything(recipe.seed)
                bundle = self._load_base(task, data, device)
                self._check_stages(bundle, data, device)  # model-dependent mistakes, before anything is written
        except BaseException as exc:
            ranks.agree(exc)
        ranks.agree(None)
        ranks.on_main(self._open_folder)

        env = collect_environment()
        previous = self._previous_manifest() if ranks.is_main else {}
        self.manifest = {
            "schema": 1,
            "name": recipe.name,
            "status": "running",
            "started": previous.get("started") or now(),
            "seed": recipe.seed,
            "device": device,
            "world_size": ranks.world_size,
            "recipe": recipe.to_dict(),
            "environment": env.model_dump(),
            "stages": [s for s in previous.get("stages") or [] if isinstance(s, dict)]
            if isinstance(previous.get("stages"), list) else [],
        }
        self.report = (self._previous_report() if ranks.is_main else None) or Report(
            name=recipe.name, created=now(), seed=recipe.seed, recipe=recipe.to_dict(), environment=env)
        self.report.status, self.report.error = "running", None
        ranks.on_main(self._write_manifest)
        try:
            self._run_all(task, data, device, bundle)
            # Rank 0 times every eval point's model side by side, before the goals read the figures.
            ranks.on_main(lambda: measure_side_by_side(self.report, recipe, self.out, task, data, device,
                                                       self.stop))
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
            wrapped = explain_failure(exc, self.out, self._where() if self.current_stage else None)
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
                if not ranks.is_main:
                    raise FolderVanished("only rank 0 writes the run's records")
                self._write_report()
                self._write_manifest(status=status, error=message, failed_stage=self.current_stage,
                                     finished=now())
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

        def finish() -> None:
            self._write_report()
            self._write_manifest(status="complete", finished=now())

        ranks.on_main(finish)
        return self.report

    def _load_base(self, task: str, data: DataBundle, device: str) -> ModelBundle:
        """The recipe's model, loaded as its first stage wants it (QLoRA: straight into NF4)."""
        return load_base_model(self.recipe.model, task, data, device, self.recipe.seed,
                               nf4=base_load_plan(self.recipe.stages), device_map=self.device_map)

    def _open_folder(self) -> None:
        """Create (or reopen) the run folder: locked, marked, and cleared of a killed run's temporaries."""
        if self.out.exists():
            self.lock.acquire()
        if self.overwrite:
            clear_run_folder(self.out)  # only a marked run holding nothing foreign gets here
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        if read_marker(self.out) is None:
            write_marker(self.out, "run")
        clean_temporaries(self.out, {p.parent.name for p in self.out.glob(f"*/{STAGE_FILE}")})

    def _where(self) -> str:
        index = self.current_index if self.current_stage else None
        if index is None:
            return "the run (baseline evaluation or run records)"
        return f"stages[{index}] ({self.recipe.stages[index].stage_type()})"

    def _run_all(self, task: str, data: DataBundle, device: str, bundle: ModelBundle | None) -> None:
        recipe, ranks = self.recipe, self.ranks
        reference = None

        baseline_dir = self.out / BASELINE_DIR
        if recipe.eval.baseline:
            def baseline() -> Any:
                if self.stage_cache:
                    self.stage_cache.restore(baseline_dir, None)
                previous = recorded_baseline(baseline_dir) if self.resume or self.stage_cache else None
                if previous is None:
                    log.info("evaluating baseline")
                    model = bundle or self._load_base(task, data, device)
                    previous = evaluate_bundle(model, "baseline", recipe.eval, data=data, device=device,
                                               seed=recipe.seed)
                    if model.info.get("placement"):
                        previous[0].notes.append(model.info["placement"])
                    if model.info.get("qlora_base"):
                        previous[0].notes.append(
                            "measured on the base as QLoRA loads it: linear layers in NF4 straight from the "
                            "checkpoint (the full-precision model is never loaded)")
                    save_eval(baseline_dir, *previous)
                    if self.stage_cache:
                        self.stage_cache.store(baseline_dir, None)
                self._add_point(previous[0])
                return previous[1]

            reference = ranks.on_main(baseline)  # the other ranks wait; only rank 0 evaluates

        last_dir: Path | None = None
        rerun = False  # once a stage runs again, every later stage must too: its input changed
        for index, stage in enumerate(recipe.stages):
            entry = get_stage(stage.stage_type())
            folder = self.out / stage_dir_name(index, entry.type)
            ranks.agree(Interrupted(f"interrupted before stage {index + 1} ({entry.type}); finished stages are "
                                    f"kept — rerun with --resume to continue") if self.stop.is_set() else None)
            if not rerun and ranks.on_main(lambda: self._reuse_finished(index, stage, folder, data, device,
                                                                        reference)):
                bundle = None  # the next stage that runs loads this output from disk
                last_dir = folder
                continue
            rerun = True
            self.current_stage, self.current_index = folder.name, index
            run_it = partial(self._run_stage, entry, stage, index, bundle, last_dir, task, data, device)
            finish = partial(self._finish_stage, entry, stage, index, folder, data=data, device=device,
                             reference=reference)
            if entry.distributed:  # training: every rank takes part
                result, seconds = self._on_all(run_it)
                ranks.on_main(lambda: finish(result, seconds))
                bundle = result.bundle
            else:  # one-shot: rank 0 runs it; the others read its output when they next need a model
                def one_shot() -> None:
                    finish(*run_it())

                ranks.on_main(one_shot)
                bundle = None
            last_dir = folder
            self.current_stage = None

    def _on_all(self, work: Any) -> Any:
        """Run `work` on every rank; all ranks raise when any of them failed."""
        try:
            result = work()
        except BaseException as exc:
            self.ranks.agree(exc)
        self.ranks.agree(None)
        return result

    def _reuse_finished(self, index: int, stage: Any, folder: Path, data: DataBundle, device: str,
                        reference: torch.Tensor | None) -> bool:
        """With --resume or a stage cache: reuse a finished stage whose inputs are unchanged."""
        if self.stage_cache and self.stage_cache.restore(folder, index):
            log.info("stage %d (%s): reused from the stage cache", index + 1, stage.stage_type())
        if not ((self.resume or self.stage_cache) and stage_done(self.fingerprints, folder, index, verify=True)):
            return False
        log.info("stage %d (%s): unchanged since the last run, skipped", index + 1, stage.stage_type())
        record = quiet_json(folder / STAGE_FILE) or {}
        # Re-listed, so a lost or damaged run.json is rebuilt from the stage records.
        self.manifest["stages"] = [s for s in self.manifest["stages"] if s.get("index") != index] + [record]
        if stage.evaluate and self.recipe.eval.after_each_stage:
            # A stage is finished only with its eval point on disk: a kill between stage.json
            # and eval.json, or a damaged eval.json, means measuring it again now.
            point = read_model(folder / "eval.json", EvalPoint, "this eval point is measured again")
            if point is None:
                self.current_stage, self.current_index = folder.name, index
                point = self._evaluate_stage(ModelBundle.load(folder, device=device), folder, stage, data, device,
                                             reference, record.get("seconds"), record.get("facts") or {})
                self.current_stage = None
            self._add_point(point)
        return True

    def _run_stage(self, entry: Any, stage: Any, index: int, bundle: ModelBundle | None, last_dir: Path | None,
                   task: str, data: DataBundle, device: str) -> tuple[StageResult, float]:
        """Run one stage on the model in memory (or the previous output, loaded from disk)."""
        recipe = self.recipe
        if bundle is None:
            bundle = (ModelBundle.load(last_dir, device=device) if last_dir
                      else self._load_base(task, data, device))
        ctx = self._context(index, data, device)
        log.info("stage %d/%d: %s", index + 1, len(recipe.stages), stage.label())
        _seed_everything(ctx.seed)
        started = time.perf_counter()
        result = entry.run(bundle, stage, ctx)
        if isinstance(result, ModelBundle):  # a stage written against the first contract: no facts
            result = StageResult(result, result.info.pop("last_stage", {}))
        return result, round(time.perf_counter() - started, 3)

    def _finish_stage(self, entry: Any, stage: Any, index: int, folder: Path, result: StageResult, seconds: float,
                      *, data: DataBundle, device: str, reference: torch.Tensor | None) -> None:
        """Rank 0: save the stage's output atomically, record it, then measure it."""
        self._check_folder_kept()
        result.bundle.save(folder)
        fault("after_stage_save")
        shutil.rmtree(self._context(index, data, device).work_dir, ignore_errors=True)
        record = new_stage_record(index=index, stage_type=entry.type, folder=folder, seconds=seconds,
                                  fingerprint=self.fingerprints[index], world_size=self.ranks.world_size,
                                  artifacts=result.artifacts, facts=result.facts)
        write_json_atomic(folder / STAGE_FILE, record)
        fault("after_stage_json")
        self.manifest["stages"] = [s for s in self.manifest["stages"] if s.get("index") != index] + [record]
        self._write_manifest()
        if stage.evaluate and self.recipe.eval.after_each_stage:
            self._add_point(self._evaluate_stage(result.bundle, folder, stage, data, device, reference, seconds,
                                                 result.facts))
        if self.stage_cache:
            self.stage_cache.store(folder, index)

    def _evaluate_stage(self, bundle: ModelBundle, folder: Path, stage: Any, data: DataBundle, device: str,
                        reference: torch.Tensor | None, seconds: float | None, facts: dict[str, Any]) -> EvalPoint:
        log.info("evaluating after %s", stage.label())
        point, _ = evaluate_bundle(bundle, folder.name, self.recipe.eval, data=data, device=device,
                                   seed=self.recipe.seed, saved_dir=folder, reference=reference)
        point.stage_type = stage.stage_type()
        point.stage_seconds = seconds
        point.stage_info = facts
        write_json_atomic(folder / "eval.json", point.model_dump(mode="json"))
        fault("after_eval_json")
        return point

    def _context(self, index: int, data: DataBundle, device: str) -> RunContext:
        """The stage's view of the run: the runner names every folder in it."""
        stages = self.recipe.stages
        name = stage_dir_name(index, stages[index].stage_type())
        earlier = [StageOutput(i, s.stage_type(), s.name, self.out / stage_dir_name(i, s.stage_type()))
                   for i, s in enumerate(stages[:index])]
        return RunContext(output_dir=self.out, seed=self.recipe.seed + index + 1, device=device, data=data,
                          work_dir=self.out / f".work-{name}", stage_name=name, earlier=earlier,
                          resume=self.resume, show_progress=self.show_progress and self.ranks.is_main, logger=log,
                          stop=self.stop, rank=self.ranks.rank, world_size=self.ranks.world_size)

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

    def _previous_manifest(self) -> dict[str, Any]:
        if not self.resume:
            return {}
        previous = quiet_json(self.out / RUN_FILE) or {}  # damage was said by check_output_folder
        return previous if isinstance(previous.get("name"), str) else {}

    def _previous_report(self) -> Report | None:
        if not self.resume:
            return None
        return read_model(self.out / "report.json", Report, "it is rebuilt from the eval points on disk")


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


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
