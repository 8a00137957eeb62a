"""export stage: write the model for a serving runtime and check it in that runtime (terminal).

One or more `export` stages end a recipe. Each format is a small config with its own handler in
compress/export/formats/ (registered in `EXPORT_FORMATS`, compress/export/config.py); this module only
refuses what cannot work (before any work, from `check_export`), dispatches to the format, and writes
the artefacts into the run folder under `exports/<name or format>/` (model file(s), tokenizer,
`export.json` with the runtime's numbers, `HOW_TO_LOAD.md`). The bundle is returned unchanged, so
the export's numbers land in the report beside PyTorch's.
"""

from __future__ import annotations

from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.errors import StageError
from compress.export import formats  # noqa: F401  (registers every format)
from compress.export.config import (
    EXPORT_FORMATS,
    FACTS_FILE,
    Export,
    export_folder,
    export_label,
    how_to_load,
)
from compress.io import atomic_dir, write_json_atomic, write_text_atomic
from compress.registry import StageResult, register_stage

EXPORTS_DIR = "exports"


def _problems(bundle: ModelBundle, config: Export) -> list[str]:
    from compress.export import problems

    return problems(bundle, config.format) + config.format_problems(bundle)


def check_export(bundle: ModelBundle, config: Export, ctx: RunContext) -> list[str]:
    found = _problems(bundle, config)
    if ctx.data is None or not config.eval_samples:
        found.append("export: needs a data section with held-out rows (the export is checked on them)")
    # (That only exports follow an export is the recipe's own check: the stage is registered terminal.)
    if any(e.type == "export" and export_label(e) == export_label(config) for e in ctx.earlier):
        found.append(f"export: two export stages would write exports/{export_label(config)}; give them distinct "
                     f"names")
    return found


def run_export(bundle: ModelBundle, config: Export, ctx: RunContext) -> StageResult:
    found = _problems(bundle, config)
    if found:
        raise StageError("; ".join(found))
    ctx.require_data("export")
    target = ctx.artifact_dir(EXPORTS_DIR, export_label(config))
    handler = EXPORT_FORMATS.handler(config)
    # A one-shot stage: under a distributed launch the runner runs it on rank 0 only.
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with atomic_dir(target) as tmp:
            facts = handler(bundle, config, ctx, tmp)
            facts["folder"] = str(target)
            write_json_atomic(tmp / FACTS_FILE, facts)
            write_text_atomic(tmp / "HOW_TO_LOAD.md", how_to_load(config, bundle.task, facts))
    finally:
        bundle.model.train(was_training)
    out = bundle.replace()
    out.record("export", config.model_dump(mode="json"),
               **{k: v for k, v in facts.items() if k != "quantization_config"})
    return StageResult(out, facts, [target])


register_stage(Export, run_export, check=check_export, terminal=True)

__all__ = ["EXPORT_FORMATS", "Export", "check_export", "export_folder", "run_export"]
