"""Publish a finished run to the Hugging Face Hub: model, tokenizer, recipe, report, plots, model card.

The folder to upload is built first (that is all `--dry-run` does), then pushed in one commit with
huggingface_hub. The token comes from HF_TOKEN or the stored login (`huggingface_hub.get_token`),
is handed to the client only, and is never printed or written; the folder is checked for it
before anything leaves the machine.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from compress import DISTRIBUTION
from compress.errors import CompressError
from compress.hub_adapters import copy_task_adapters
from compress.io import atomic_dir
from compress.ownership import MARKER, check_output, write_marker
from compress.portable import is_compress_only
from compress.report.render import PLOTS_DIR, comparison_rows
from compress.report.schema import Report

log = logging.getLogger("compress")

# Run records, and pruning masks (only later compress stages need them; inference never does, and
# for SmolLM2 they add 106 MB, +20%).
SKIP_FILES = {"stage.json", "eval.json", "predictions.safetensors", "masks.safetensors"}
ADAPTER_DIR = "adapter"


class PublishSpec(BaseModel):
    """The recipe's `publish:` section: defaults for `compress push`."""

    model_config = ConfigDict(extra="forbid")

    repo_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="ORG/NAME on the Hub.")
    private: bool = Field(True, description="Create the repo private (the default).")
    base_model: str | None = Field(None, description="Hub id for the card's base_model (default: model.path "
                                                     "when it is a Hub id).")
    license: str | None = Field(None, description="License id for the card, e.g. apache-2.0.")
    tags: list[str] = Field(default_factory=list, description="Extra tags for the card.")
    push_after_run: bool = Field(False, description="Push automatically when `compress run` finishes.")
    export: str | None = Field(None, description="Publish this export of the run (exports/NAME) instead of its "
                                                 "final model (as `compress push --export NAME`).")
    allow_compress_format: bool = Field(False, description=(
        "Publish a final model in compress's own format, which only compress loads (as `compress push "
        "--allow-compress-format`); refused otherwise."))


class PublishError(CompressError):
    exit_code = 2


def final_stage_dir(run_dir: Path) -> Path:
    manifest = json.loads((run_dir / "run.json").read_text())
    stages = sorted(manifest.get("stages", []), key=lambda s: s["index"])
    if not stages:
        raise PublishError(f"{run_dir}: the run has no stage output to publish (it ran no stage)")
    folder = run_dir / stages[-1]["dir"]
    if not (folder / "config.json").exists():
        raise PublishError(f"{folder}: the final stage's model folder is missing or incomplete")
    return folder


def hub_id(path: str) -> str | None:
    """`path` when it names a Hub model, None for a local folder (never published as a base)."""
    from compress.paths import looks_like_local_path

    return None if looks_like_local_path(path) else path


def _task_tag(task: str) -> str:
    return {"sequence-classification": "text-classification", "causal-lm": "text-generation"}.get(task, task)


# How the card says to install compress: by its distribution name (the PyPI package named `compress`
# is an unrelated project), from a clone of its source repository, pinned by its lock file.
INSTALL = f"""```bash
# compress is the distribution `{DISTRIBUTION}` (the PyPI package named `compress` is a different
# project). In a clone of compress's source repository:
pip install -c requirements.lock -e .   # installs {DISTRIBUTION}
```"""

# bitsandbytes repacks 4-bit weights for CPUs with AVX512-BF16 and computes them in bf16 there;
# compress pins the portable fp32 path (quant/bnb_weights) so its figures agree on every machine.
BNB4_CPU_NOTE = """
On CPUs with AVX512-BF16, bitsandbytes computes these 4-bit layers in bf16, so the logits there differ
from the figures above by bf16 rounding (about 0.5% of the largest logit on compress's tiny test models);
compress measured them on bitsandbytes' fp32 path, the same on every machine."""


def is_bnb_4bit(model_dir: Path) -> bool:
    """Whether `model_dir` holds a bitsandbytes 4-bit checkpoint (its config's quantization_config)."""
    path = model_dir / "config.json"
    qc = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    return bool(isinstance(qc, dict) and qc.get("load_in_4bit"))


def how_to_load(task: str, fmt: str, name: str, bnb_4bit: bool = False) -> str:
    """The card's loading instructions for the published folder's format."""
    load = "AutoModelForSequenceClassification" if task == "sequence-classification" else "AutoModelForCausalLM"
    if fmt == "hf":
        return f"""```python
from transformers import AutoTokenizer, {load}
model = {load}.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```""" + (BNB4_CPU_NOTE if bnb_4bit else "")
    if fmt == "peft-adapter":
        return f"""The base weights are at the top of the repository and the fine-tuned adapter in `{ADAPTER_DIR}/`
(PEFT format); loading the base alone gives the model *before* fine-tuning.

```python
from peft import PeftModel
from transformers import AutoTokenizer, {load}
base = {load}.from_pretrained("{name}")
model = PeftModel.from_pretrained(base, "{name}", subfolder="{ADAPTER_DIR}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```"""
    return f"""This checkpoint holds compress's own layers (format `{fmt}`), which transformers cannot build:
its `config.json` declares a `model_type` naming compress so that plain `from_pretrained` refuses it
instead of loading random weights. Load it with compress:

{INSTALL}

```python
from compress import ModelBundle
from huggingface_hub import snapshot_download
bundle = ModelBundle.load(snapshot_download("{name}"))
model, tokenizer = bundle.model, bundle.tokenizer
```"""


EXPORTS_DIR = "exports"
EXPORT_FACTS = "export.json"
EXPORT_HOW_TO = "HOW_TO_LOAD.md"
# An export's own runtime decides how it loads (the card says which); transformers only for these.
_EXPORT_LIBRARY = {"onnx": "onnx", "gguf": "gguf", "compressed-tensors": "transformers"}


def publish_dir_name(export: str | None) -> str:
    """The run's own folder for what a push uploads: `publish/`, or `publish-<export>/` for an export."""
    return "publish" if export is None else f"publish-{export}"


def finished_exports(run_dir: Path) -> list[str]:
    """The names of the run's finished exports (folders under `exports/` with their facts)."""
    root = run_dir / EXPORTS_DIR
    return sorted(p.name for p in root.iterdir() if (p / EXPORT_FACTS).is_file()) if root.is_dir() else []


def export_folder(run_dir: Path, name: str) -> Path:
    """A finished export of the run (`exports/<name>/` with its runtime check's facts)."""
    folder = run_dir / EXPORTS_DIR / name
    if not (folder / EXPORT_FACTS).is_file():
        known = finished_exports(run_dir)
        raise PublishError(f"--export {name}: {run_dir} has no finished export of that name (exports: "
                           f"{', '.join(known) or 'none'}); write one with `compress export {run_dir} --format "
                           f"onnx|compressed-tensors|gguf` or an export stage")
    return folder


def _export_how_to(folder: Path, name: str) -> str:
    short = name.split("/")[-1]
    text = (folder / EXPORT_HOW_TO).read_text() if (folder / EXPORT_HOW_TO).is_file() else ""
    body = text.split("\n", 1)[1].strip() if text.startswith("#") else text.strip()
    return (f"Download the repository, then run the snippet from inside that folder:\n\n```bash\n"
            f"hf download {name} --local-dir {short} && cd {short}\n```\n\n{body}")


def build_model_card(report: Report, spec: PublishSpec, task: str, repo_id: str | None,
                     fmt: str = "hf", export: Path | None = None, adapters: str = "", bnb_4bit: bool = False) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    recipe = report.recipe
    final, base = report.final, report.baseline
    source = recipe.get("data", {}).get("source", "")
    dataset = hub_id(source) or Path(source.removeprefix("pkg:")).name
    results = []
    if final and final.accuracy:
        for metric in ("accuracy", "macro_f1", "perplexity"):
            value = getattr(final.accuracy, metric)
            if value is not None:
                results.append(EvalResult(task_type=_task_tag(task), dataset_type=dataset, dataset_name=dataset,
                                          metric_type=metric, metric_value=value))
    stage_types = [s.get("type") for s in recipe.get("stages", [])]
    data = ModelCardData(
        base_model=spec.base_model or hub_id(recipe.get("model", {}).get("path", "")),
        library_name=_EXPORT_LIBRARY.get(fmt, "transformers") if export else "transformers",
        license=spec.license,
        pipeline_tag=_task_tag(task),
        tags=["compress", *stage_types, *([fmt] if export else []), *spec.tags],
        model_name=(repo_id or report.name).split("/")[-1],
        eval_results=results or None,
    )
    header, rows = comparison_rows(report)
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    steps = []
    for i, stage in enumerate(recipe.get("stages", [])):
        settings = ", ".join(f"{k}={v}" for k, v in stage.items() if k != "type" and v not in (None, [], {}))
        steps.append(f"{i + 1}. **{stage.get('type')}** — {settings}")
    name = repo_id or "ORG/NAME"
    body = f"""
# {data.model_name}

Compressed with compress from `{recipe.get('model', {}).get('path')}`
by the recipe in `recipe.yaml` (seed {report.seed}).

## What was done

{chr(10).join(steps) or "No stage."}

## Results

Measured by compress on {report.environment.cpu or 'CPU'} ({report.environment.cpu_count} cores),
against the base model in the same run. Ratios (×) and point differences (pt) are against the baseline.

{table}

Full report: `report.md` / `report.html` (plots in `{PLOTS_DIR}/`), raw figures in `report.json`.

## How to load

{_export_how_to(export, name) if export else how_to_load(task, fmt, name, bnb_4bit)}
{_export_checks(export) if export else ""}{adapters}
## Reproduce

{INSTALL}

then:

```bash
compress run recipe.yaml
```
"""
    if base is None:
        body += "\nNo baseline was measured in this run.\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def _export_checks(folder: Path) -> str:
    """The export's runtime check, in the card: the figures its export stage measured and enforced."""
    facts = json.loads((folder / EXPORT_FACTS).read_text())
    lines = [f"| {k} | {v} |" for k, v in facts.items()
             if k != "folder" and isinstance(v, (int, float, str, bool)) and v is not None]
    return ("\n## Checked in its runtime\n\nMeasured by compress on held-out rows when the export was written "
            "(its `" + EXPORT_FACTS + "`):\n\n| figure | value |\n|---|---|\n" + "\n".join(lines) + "\n")


def compress_format_refusal(run_dir: Path, model_dir: Path) -> str:
    """Why a push of `model_dir` (a compress-only folder) is refused, and the alternatives."""
    fmt = json.loads((model_dir / "compress_bundle.json").read_text()).get("format", "?")
    exports = finished_exports(run_dir)
    have = (f"this run has: {', '.join(exports)}" if exports else
            f"write one first with `compress export {run_dir} --format onnx|compressed-tensors|gguf`")
    return (f"push: {run_dir}'s final model ({model_dir.name}) is in compress's own format {fmt!r}, which only "
            f"compress loads (plain transformers, vLLM or llama.cpp cannot). Publish an export a serving runtime "
            f"loads with --export NAME ({have}), or pass --allow-compress-format to publish compress's format "
            f"anyway (its card says to install {DISTRIBUTION}); nothing was written")


def build_publish_folder(run_dir: str | Path, output: str | Path, spec: PublishSpec,
                         repo_id: str | None = None, export: str | None = None,
                         allow_compress_format: bool = True) -> Path:
    """Write exactly what would be uploaded into `output` (atomically) and return it: the run's final
    model, or with `export` that export of it (`exports/<export>/`, for its runtime). A final model in
    a compress-only format is refused unless `allow_compress_format` (`push` passes its flag)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists() or not (run_dir / "report.json").exists():
        raise PublishError(f"{run_dir}: not a finished compress run (no run.json/report.json)")
    report = Report.model_validate_json((run_dir / "report.json").read_text())
    if report.status != "complete":
        raise PublishError(f"{run_dir}: the run's status is {report.status!r}; only complete runs are published")
    model_dir = final_stage_dir(run_dir)
    bundle_meta = json.loads((model_dir / "compress_bundle.json").read_text())
    exported = export_folder(run_dir, export) if export else None
    if exported is None and not allow_compress_format and is_compress_only(model_dir):
        raise PublishError(compress_format_refusal(run_dir, model_dir))
    # The folder is replaced as a whole: only a new one, or one an earlier push wrote (the run's
    # own publish/ included), may be.
    output = check_output(output, "publish", inputs=[run_dir], allowed_inside=run_dir / publish_dir_name(export))
    with atomic_dir(output) as tmp:
        if exported is not None:
            _copy_export(exported, tmp)
        for item in model_dir.iterdir() if exported is None else []:
            if item.is_file() and item.name not in SKIP_FILES:
                shutil.copy2(item, tmp / item.name)
        if exported is None and bundle_meta.get("format") == "peft-adapter":  # the fine-tune itself: without it, only the base
            shutil.copytree(model_dir / ADAPTER_DIR, tmp / ADAPTER_DIR)
        for name in ("report.json", "report.md", "report.html"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, tmp / name)
        if (run_dir / PLOTS_DIR).is_dir():
            shutil.copytree(run_dir / PLOTS_DIR, tmp / PLOTS_DIR)
        recipe = {k: v for k, v in report.recipe.items() if k != "output_dir"}
        # A compose stage's task adapters travel with the final model (not with an export's runtime files).
        adapters = "" if exported is not None else copy_task_adapters(run_dir, tmp, recipe, repo_id or "ORG/NAME")
        (tmp / "recipe.yaml").write_text("# compress run recipe.yaml\n" + yaml.safe_dump(recipe, sort_keys=False))
        fmt = (json.loads((exported / EXPORT_FACTS).read_text()).get("format", export) if exported
               else bundle_meta.get("format", "hf"))
        (tmp / "README.md").write_text(build_model_card(report, spec, bundle_meta["task"], repo_id, fmt,
                                                        export=exported, adapters=adapters,
                                                        bnb_4bit=exported is None and is_bnb_4bit(model_dir)))
        write_marker(tmp, "publish", entries=[p.name for p in tmp.iterdir()])
    return output


def _copy_export(folder: Path, tmp: Path) -> None:
    """The export's files as written, less the local folder path its facts record."""
    for item in folder.rglob("*"):
        if item.is_file() and item.name != MARKER:
            target = tmp / item.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
    facts = json.loads((folder / EXPORT_FACTS).read_text())
    facts.pop("folder", None)
    (tmp / EXPORT_FACTS).write_text(json.dumps(facts, indent=1))


def _assert_no_secret(folder: Path, token: str | None) -> None:
    if not token:
        return
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise PublishError(f"{path.name} contains your Hub token; remove it before publishing (nothing was sent)")


def push(run_dir: str | Path, repo_id: str, *, private: bool = True, spec: PublishSpec | None = None,
         dry_run: bool = False, output: str | Path | None = None, endpoint: str | None = None,
         export: str | None = None, allow_compress_format: bool = False) -> dict[str, Any]:
    """Build the publish folder, then (unless dry_run) create the repo and upload it in one commit.

    A final model in a compress-only format (its config.json's model_type names compress) is refused,
    dry run included, unless `allow_compress_format`: a Hub user without compress could not load it; `export` names
    an export of the run (onnx, compressed-tensors, gguf) that its runtime loads instead."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    run_dir = Path(run_dir)
    spec = spec or PublishSpec()
    export = export or spec.export
    allow_compress_format = allow_compress_format or spec.allow_compress_format
    folder = Path(output) if output else run_dir / publish_dir_name(export)
    build_publish_folder(run_dir, folder, spec, repo_id, export, allow_compress_format=allow_compress_format)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    if dry_run:
        return {"dry_run": True, "folder": str(folder), "files": files, "repo_id": repo_id, "private": private}
    token = get_token()
    if not token:
        raise PublishError("no Hub token: set HF_TOKEN or run `hf auth login` (the token is never stored by compress)")
    _assert_no_secret(folder, token)
    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    # One commit of plain additions (rather than upload_folder's streamed pipeline) keeps the upload
    # atomic on the Hub: either every file lands or none does.
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    info = api.create_commit(repo_id, operations=operations, commit_message=f"compress: publish {run_dir.name}")
    log.info("pushed %d files to %s", len(files), url)
    return {"dry_run": False, "folder": str(folder), "files": files, "repo_id": repo_id, "private": private,
            "url": str(url), "commit": info.oid}
