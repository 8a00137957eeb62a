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
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.data import DataBundle, load_data
from compress.environment import collect_environment
from compress.errors import CompressError, Interrupted, RecipeError, RunFolderError
from compress.evaluate.point import evaluate_bundle
from compress.io import write_json_atomic
from compress.loading import load_base_model, resolve_task
from compress.recipe import Recipe, load_recipe
from compress.registry import get_stage
from compress.report.render import write_report
from compress.report.schema import EvalPoint, Report

log = logging.getLogger("compress")

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
BASELINE_DIR = "00-baseline"
PREDICTIONS_FILE = "predictions.safetensors"


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


def check_output_folder(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that belongs to another run, or a finished one, unless told otherwise."""
    if out.is_symlink():
        raise RunFolderError(f"output folder {str(out)!r} is a symbolic link (to {str(out.resolve())!r}); "
                             f"give a real folder so outputs cannot land somewhere unexpected")
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = out / RUN_FILE
    if not manifest.exists():
        raise RunFolderError(
            f"output folder {str(out)!r} is not empty and holds no compress run; "
            f"choose another output_dir (nothing there was touched)"
        )
    previous = json.loads(manifest.read_text())
    if overwrite:
        return
    if previous.get("name") != recipe.name:
        raise RunFolderError(
            f"output folder {str(out)!r} belongs to run {previous.get('name')!r}; "
            f"pass --overwrite to replace it, or set output_dir"
        )
    if not resume:
        raise RunFolderError(
            f"output folder {str(out)!r} already holds a run of {recipe.name!r}; "
            f"pass --resume to continue it or --overwrite to start again"
        )


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
        write_json_atomic(self.out / RUN_FILE, self.manifest)

    def _write_report(self, plots: bool = True) -> None:
        assert self.report is not None
        write_report(self.report, self.out, plots=plots)

    def _add_point(self, point: EvalPoint) -> None:
        assert self.report is not None
        names = [p.name for p in self.report.points]
        if point.name in names:  # re-measured on resume: keep its place in the sequence
            self.report.points[names.index(point.name)] = point
        else:
            self.report.points.append(point)
        # The figures so far, after every point, so a killed run still leaves a report; the plots
        # (about 1.5 s of matplotlib each time) are drawn once, when the run ends or fails.
        self._write_report(plots=False)

    # ------------------------------------------------------------------ run

    def run(self) -> Report:
        recipe = self.recipe
        check_output_folder(self.out, recipe, self.resume, self.overwrite)
        self._check_resume_points()
        device = resolve_device(recipe)
        task = resolve_task(recipe.model)
        data = load_data(recipe.data, task, recipe.seed)  # cheap checks before the model loads
        bundle = None
        if not self.resume or not all(self._stage_done(self.out / stage_dir_name(i, s.stage_type()), i)
                                      for i, s in enumerate(recipe.stages)):
            _seed_everything(recipe.seed)
            bundle = load_base_model(recipe.model, task, data, device, recipe.seed)
            self._check_stages(bundle, data, device)  # model-dependent mistakes, before anything is written
        if self.overwrite and (self.out / RUN_FILE).exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

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
            "stages": previous.get("stages", []),
        }
        self.report = self._previous_report() or Report(
            name=recipe.name, created=_now(), seed=recipe.seed, recipe=recipe.to_dict(), environment=env)
        self.report.status, self.report.error = "running", None
        self._write_manifest()
        try:
            self._run_all(task, data, device, bundle)
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
            wrapped = None
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                wrapped = CompressError(f"disk full while writing into {str(self.out)!r} ({exc}); finished stages "
                                        f"are intact; free some space and rerun with --resume")
            shown = wrapped or exc
            message = str(shown) if isinstance(shown, CompressError) else f"{type(exc).__name__}: {exc}"
            self.report.status, self.report.error = status, message
            self.report.failed_stage = self.current_stage
            try:  # the disk may still be full: recording the failure must not hide it
                self._write_report()
                self._write_manifest(status=status, error=message, failed_stage=self.current_stage,
                                     finished=_now())
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

    def _run_all(self, task: str, data: DataBundle, device: str, bundle: ModelBundle | None) -> None:
        recipe = self.recipe
        reference = None

        baseline_dir = self.out / BASELINE_DIR
        if recipe.eval.baseline:
            self._restore_from_cache(baseline_dir, None)
            if (self.resume or self.stage_cache) and (baseline_dir / "eval.json").exists():
                self._add_point(EvalPoint.model_validate_json((baseline_dir / "eval.json").read_text()))
                reference = _load_predictions(baseline_dir)
            else:
                bundle = bundle or load_base_model(recipe.model, task, data, device, recipe.seed)
                log.info("evaluating baseline")
                point, reference = evaluate_bundle(bundle, "baseline", recipe.eval, data=data, device=device,
                                                   seed=recipe.seed)
                _save_eval(baseline_dir, point, reference)
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
                point_file = folder / "eval.json"
                if point_file.exists():
                    self._add_point(EvalPoint.model_validate_json(point_file.read_text()))
                last_dir, bundle = folder, None
                continue
            if bundle is None:
                bundle = (ModelBundle.load(last_dir, device=device) if last_dir
                          else load_base_model(recipe.model, task, data, device, recipe.seed))
            rerun = True
            self.current_stage = folder.name
            ctx = self._context(index, data, device)
            log.info("stage %d/%d: %s", index + 1, len(recipe.stages), stage.label())
            _seed_everything(ctx.seed)
            started = time.perf_counter()
            bundle.info.pop("last_stage", None)
            bundle = entry.run(bundle, stage, ctx)
            seconds = round(time.perf_counter() - started, 3)
            bundle.save(folder)
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
            record = {"index": index, "type": entry.type, "dir": folder.name, "seconds": seconds,
                      "fingerprint": self.fingerprints[index], "finished": _now(), "files": _file_digests(folder)}
            write_json_atomic(folder / STAGE_FILE, record)
            self.manifest["stages"] = [s for s in self.manifest["stages"] if s["index"] != index] + [record]
            self._write_manifest()
            last_dir = folder
            if stage.evaluate and recipe.eval.after_each_stage:
                log.info("evaluating after %s", stage.label())
                point, _ = evaluate_bundle(bundle, folder.name, recipe.eval, data=data, device=device,
                                           seed=recipe.seed, saved_dir=folder, reference=reference)
                point.stage_type = entry.type
                point.stage_seconds = seconds
                point.stage_info = bundle.info.get("last_stage", {})
                write_json_atomic(folder / "eval.json", point.model_dump(mode="json"))
                self._add_point(point)
            self._store_in_cache(folder, index)
            self.current_stage = None

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
        path = self.out / RUN_FILE
        return json.loads(path.read_text()) if self.resume and path.exists() else {}

    def _previous_report(self) -> Report | None:
        path = self.out / "report.json"
        if self.resume and path.exists():
            return Report.model_validate_json(path.read_text())
        return None

    def _stage_done(self, folder: Path, index: int, verify: bool = False) -> bool:
        """Finished with the same fingerprint; with `verify`, every output file is intact too."""
        record_path = folder / STAGE_FILE
        if not record_path.exists():
            return False
        if folder.is_symlink():
            raise RunFolderError(f"{folder} is a symbolic link; stage folders must be real folders")
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") != self.fingerprints[index]:
            return False
        if verify:
            problem = _verify_files(folder, record.get("files", {}))
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
            record_path = folder / STAGE_FILE
            if not record_path.exists():
                break
            if json.loads(record_path.read_text()).get("fingerprint") != self.fingerprints[index]:
                old = json.loads((self.out / RUN_FILE).read_text()).get("recipe", {})
                changed = _describe_change(old, self.recipe.to_dict(), index)
                raise RunFolderError(
                    f"cannot resume: stage {index + 1} ({stage.stage_type()}) or its inputs changed since "
                    f"{folder.name} was written ({changed}); pass --overwrite to start again, "
                    f"or restore the recipe"
                )


def _describe_change(old: dict[str, Any], new: dict[str, Any], index: int) -> str:
    diffs = []
    for key in ("model", "data", "seed"):
        if old.get(key) != new.get(key):
            diffs.append(key)
    old_stages, new_stages = old.get("stages", []), new.get("stages", [])
    for i in range(index + 1):
        a = old_stages[i] if i < len(old_stages) else {}
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every output file, so a truncated or corrupted one is caught on resume."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (STAGE_FILE, "eval.json")}


def _verify_files(folder: Path, expected: dict[str, dict[str, Any]]) -> str | None:
    for name, meta in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, expected {meta['bytes']})"
        if _sha256(path) != meta["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def _save_eval(folder: Path, point: EvalPoint, preds: torch.Tensor | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if preds is not None:
        tmp = folder / f".{PREDICTIONS_FILE}.tmp"
        save_file({"preds": preds.contiguous()}, str(tmp))
        tmp.replace(folder / PREDICTIONS_FILE)
    write_json_atomic(folder / "eval.json", point.model_dump(mode="json"))


def _load_predictions(folder: Path) -> torch.Tensor | None:
    path = folder / PREDICTIONS_FILE
    return load_file(str(path))["preds"] if path.exists() else None


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
