"""`compress export RUN_DIR --format ...`: export a finished run's model, as an export stage would.

The model is the run's last stage output (or the one named by `stage`), the held-out rows are the
run's own (its recipe's data section, split with its seed), and the artefacts go to
`RUN_DIR/exports/<name or format>/`. Everything that can be refused is refused before the model
or the data is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compress.errors import RecipeError, RunFolderError

log = logging.getLogger("compress")


def stage_folder(run_dir: Path, stage: str | None) -> Path:
    """The run's stage output to export: `stage` (a folder name like 02-distill), else the last
    finished non-export stage."""
    manifest_path = run_dir / "run.json"
    if not manifest_path.exists():
        raise RunFolderError(f"{run_dir}: not a compress run folder (no run.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        stages = sorted(manifest.get("stages") or [], key=lambda s: s["index"])
    except (ValueError, KeyError, TypeError):
        raise RunFolderError(f"{manifest_path}: damaged; rerun `compress run --resume` to rebuild it") from None
    if stage is not None:
        folder = run_dir / stage
        if not (folder / "compress_bundle.json").exists():
            known = ", ".join(s["dir"] for s in stages) or "none"
            raise RunFolderError(f"--stage {stage}: no stage output of that name in {run_dir} (finished: {known})")
        return folder
    models = [s for s in stages if s.get("type") != "export" and (run_dir / s["dir"] / "compress_bundle.json").exists()]
    if not models:
        raise RunFolderError(f"{run_dir}: no finished stage output to export (status "
                             f"{manifest.get('status')!r}); run the recipe first")
    return run_dir / models[-1]["dir"]


def export_finished_run(run_dir: str | Path, fmt: str, *, stage: str | None = None,
                        settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a finished run's model to `fmt` and check it in its runtime; returns the facts."""
    from compress.bundle import ModelBundle
    from compress.context import RunContext
    from compress.data import load_data
    from compress.export.runtime import missing_runtime, task_problem
    from compress.recipe import DataSpec
    from compress.stages.export import Export, run_export

    run_dir = Path(run_dir)
    folder = stage_folder(run_dir, stage)
    try:
        config = Export(format=fmt, **(settings or {}))
    except ValidationError as exc:  # an option that does not fit the format
        raise RecipeError(f"export --format {fmt}: " + "; ".join(e["msg"].removeprefix("Value error, ")
                                                                 for e in exc.errors())) from None
    meta = json.loads((folder / "compress_bundle.json").read_text())
    early = [why for why in (task_problem(fmt, meta.get("task", "")), missing_runtime(fmt)) if why]
    if fmt == "gguf":
        from compress.export import gguf_problems

        try:
            archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            archs = []
        early += gguf_problems(meta.get("format", "hf"), archs)
    if early:
        raise RecipeError(f"export --format {fmt}: " + "; ".join(early))
    # The run's own data section and seed: the same held-out rows the run was evaluated on.
    recorded = json.loads((run_dir / "run.json").read_text())["recipe"]
    spec, seed = DataSpec.model_validate(recorded["data"]), int(recorded.get("seed", 0))
    bundle = ModelBundle.load(folder)
    data = load_data(spec, bundle.task, seed)
    ctx = RunContext(output_dir=run_dir, seed=seed, device="cpu", data=data, logger=log)
    log.info("exporting %s as %s", folder.name, fmt)
    result = run_export(bundle, config, ctx)
    return {"stage": folder.name, **result.facts}


def cmd_export(args: argparse.Namespace) -> int:
    """The `compress export` command: export, then print where and the runtime's numbers."""
    pairs = (("name", args.name), ("quantize", args.quantize), ("eval_samples", args.eval_samples),
             ("outtype", getattr(args, "outtype", None)), ("llama_quantize", getattr(args, "llama_quantize", None)),
             ("max_ppl_diff", getattr(args, "max_ppl_diff", None)), ("ppl_ctx", getattr(args, "ppl_ctx", None)))
    settings: dict[str, Any] = {k: v for k, v in pairs if v is not None}
    facts = export_finished_run(args.run_dir, args.format, stage=args.stage, settings=settings)
    print(f"exported {facts['stage']} as {args.format}: {facts['folder']}")
    for key, value in facts.items():
        if key not in ("stage", "folder") and not isinstance(value, (dict, list)):
            print(f"  {key}: {value}")
    return 0
