"""`compress` command line: thin — parse, call the Python API, print. Exit 2: bad input; 1: failed run."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from compress.errors import CompressError, RecipeError


def _setup_logging(quiet: bool, debug: bool = False) -> None:
    # --debug also shows the library messages routed to DEBUG below.
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("compress: %(message)s"))
    handler.setLevel(level)  # the console's level; a run's log file may listen at DEBUG
    logger = logging.getLogger("compress")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # Library chatter (kernel notices, deprecation warnings, progress bars) drowns the run's own log:
    # it goes to compress's DEBUG level instead (compress/console.py).
    from compress.console import route_library_output

    route_library_output()


def _graceful_sigint() -> threading.Event:
    """First Ctrl-C (or SIGTERM, e.g. from `kill` or a job scheduler): stop at the next step boundary
    and save, so the run is recorded as interrupted rather than left "running". Second: abort at once."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping at the next step boundary to save progress (Ctrl-C again to abort now)",
              file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def cmd_run(args: argparse.Namespace) -> int:
    from compress.runner import run

    stop = _graceful_sigint()
    try:
        report = run(args.recipe, args.overrides, output_dir=args.output_dir, resume=args.resume,
                     overwrite=args.overwrite, show_progress=not args.quiet, stop=stop)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun / accelerate launch, rank 0 speaks for the run
    out = args.output_dir or report.recipe.get("output_dir") or f"runs/{report.name}"
    print(f"done: {out}/report.md")
    base, final = report.baseline, report.final
    if base and final and final is not base:
        from compress.report.render import comparison_rows

        header, rows = comparison_rows(report)
        for row in rows:
            print("  " + "  ".join(f"{h}={v}" for h, v in zip(header, row, strict=True)))
    failed = [g for g in report.goals if not g.passed]
    for g in report.goals:
        actual = f"{g.actual:.4g}" if g.actual is not None else (g.detail or "not measured")
        print(f"  goal {g.metric} {g.rule} {g.target:g}: {actual} -> {'PASS' if g.passed else 'FAIL'}")
    if failed and args.strict:
        print(f"error: {len(failed)} goal(s) failed (--strict)", file=sys.stderr)
        return 3
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from compress.recipe import load_recipe

    failed = 0
    for path in args.files:
        try:
            recipe = load_recipe(path, args.set)
            print(f"{path}: ok ({len(recipe.stages)} stage(s): "
                  f"{', '.join(s.stage_type() for s in recipe.stages) or 'none'})")
        except RecipeError as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
    return 2 if failed else 0


def _describe_field(name: str, field: Any) -> str:
    from typing import Literal, get_args, get_origin

    from pydantic_core import PydanticUndefined

    if get_origin(field.annotation) is Literal:
        annotation = " | ".join(repr(a) for a in get_args(field.annotation))
    else:
        annotation = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    default = "required" if field.default is PydanticUndefined and field.default_factory is None else (
        f"default {field.default!r}" if field.default_factory is None else "default: built")
    help_text = field.description or ""
    return f"    {name}: {annotation} ({default}) {help_text}".rstrip()


def cmd_stages(args: argparse.Namespace) -> int:
    from compress.methods import family_of
    from compress.registry import stage_entries

    for entry in sorted(stage_entries(), key=lambda e: e.type):
        print(f"{entry.type}: {entry.summary}")
        base = entry.config_cls.model_fields
        for name, field in base.items():
            if name != "type":
                print(_describe_field(name, field))
        family = family_of(entry.config_cls)
        for method in family.methods() if family else []:
            print(f"  {family.key}: {method.name} -- {method.summary}")
            for name, field in method.config_cls.model_fields.items():
                if name not in base:
                    print("  " + _describe_field(name, field))
        print()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from compress.report.compare import compare_rows, compare_runs, load_report

    folder = compare_runs(args.runs, args.output)
    header, rows = compare_rows([load_report(d) for d in args.runs])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"written: {folder}/compare.md, {folder}/compare.png")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from compress.hub import PublishError, PublishSpec, push

    manifest = Path(args.run_dir) / "run.json"
    if not manifest.exists():
        raise PublishError(f"{args.run_dir}: not a compress run folder (no run.json)")
    try:
        spec = PublishSpec.model_validate(json.loads(manifest.read_text())["recipe"].get("publish") or {})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PublishError(f"{manifest}: damaged or not a compress manifest; rerun `compress run --resume` on "
                           f"that run to rebuild it (nothing was published)") from None
    repo_id = args.repo_id or spec.repo_id
    if not repo_id:
        raise PublishError("push: give --repo-id ORG/NAME (or set publish.repo_id in the recipe)")
    private = spec.private if args.private is None else args.private
    result = push(args.run_dir, repo_id, private=private, spec=spec, dry_run=args.dry_run, output=args.output,
                  export=args.export, allow_compress_format=args.allow_compress_format)
    verb = "would upload" if result["dry_run"] else "uploaded"
    print(f"{verb} {len(result['files'])} files to {repo_id} ({'private' if private else 'public'}); "
          f"folder: {result['folder']}")
    for name in result["files"]:
        print(f"  {name}")
    if not result["dry_run"]:
        print(f"commit {result['commit']}: {result['url']}")
    return 0


def cmd_autotune(args: argparse.Namespace) -> int:
    from compress.autotune import autotune, parse_budget, parse_space

    summary = autotune(args.recipe, args.output, space=parse_space(args.space), budget=parse_budget(args.budget),
                       overrides=args.set, max_candidates=args.max_candidates, show_progress=not args.quiet)
    print(f"{summary['candidates']} candidates in {summary['seconds']} s "
          f"({summary['stages_reused']} stage outputs reused); results in {args.output}/autotune.md")
    winner = summary["winner"]
    if winner is None:
        print("no candidate met the budget", file=sys.stderr)
        return 3
    print(f"winner {winner['candidate']}: {winner['settings']} -> {args.output}/winner.yaml")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages[0].lr=1e-4")
    p.add_argument("--output-dir", help="run folder (default: recipe output_dir or runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue a run, skipping unchanged finished stages")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--quiet", action="store_true", help="only warnings and the result")
    p.add_argument("--strict", action="store_true", help="exit 3 when a recipe goal is missed")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check recipes without loading models or data")
    p.add_argument("files", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override before checking")
    p.set_defaults(func=cmd_validate)

    from compress.plan.command import add_parser as add_plan_parser  # `compress plan`

    add_plan_parser(sub)

    p = sub.add_parser("compare", help="one table and one Pareto plot across run folders")
    p.add_argument("runs", nargs="+", help="run folders (with report.json)")
    p.add_argument("--output", default="compare", help="folder for compare.md/.json/.png (default: ./compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("push", help="publish a finished run (model, recipe, report, card) to the Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", help="ORG/NAME (default: the recipe's publish.repo_id)")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=None, help="private repo (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="public repo")
    p.add_argument("--dry-run", action="store_true", help="only write the folder that would be uploaded")
    p.add_argument("--output", help="where to write that folder (default: RUN_DIR/publish)")
    p.add_argument("--export", help="publish this export of the run (RUN_DIR/exports/NAME: onnx, "
                                    "compressed-tensors, gguf) instead of its final model")
    p.add_argument("--allow-compress-format", action="store_true",
                   help="publish a final model in compress's own format (only compress loads it); "
                        "refused without this flag")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("autotune", help="search stage settings for the smallest model within an accuracy budget")
    p.add_argument("recipe")
    p.add_argument("--space", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to try, e.g. stages[1].sparsity=0.3,0.5 (repeatable)")
    p.add_argument("--budget", action="append", default=[], metavar="NAME=VALUE",
                   help="accuracy_drop=0.01 and/or perplexity_ratio=1.1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base recipe")
    p.add_argument("--max-candidates", type=int)
    p.add_argument("--output", default="autotune", help="folder for results (default: ./autotune)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_autotune)

    p = sub.add_parser("export", help="export a finished run's model for a serving runtime and check it there")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["onnx", "compressed-tensors", "gguf"])
    p.add_argument("--stage", help="stage output to export, e.g. 02-distill (default: the last one)")
    p.add_argument("--name", help="folder name under RUN_DIR/exports (default: the format)")
    p.add_argument("--quantize", choices=["int8", "int4", "none"],
                   help="onnx: int8 dynamic (classifiers' default), int4 MatMulNBits (causal LMs' default) or the "
                        "fp32 graph")
    p.add_argument("--eval-samples", type=int, help="held-out rows the export is checked on (default 1000)")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="gguf: the converter's output type (default f16)")
    p.add_argument("--llama-quantize", metavar="TYPE",
                   help="gguf: then llama-quantize to TYPE, e.g. Q4_K_M, Q8_0, Q4_0")
    p.add_argument("--max-ppl-diff", type=float,
                   help="gguf: allowed relative perplexity difference from PyTorch (default by type)")
    p.add_argument("--ppl-ctx", type=int, help="gguf: tokens per perplexity chunk (default 128)")
    from compress.export.from_run import cmd_export

    p.set_defaults(func=cmd_export)

    p = sub.add_parser("stages", help="list stage types with their fields, defaults and help")
    p.set_defaults(func=cmd_stages)
    # No abbreviated flags: `--over` silently meaning --overwrite (which replaces a run folder), or
    # `--output` meaning --output-dir, is a typo argparse would otherwise accept.
    for command in [parser, *sub.choices.values()]:
        command.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `compress run r.yaml --overwrite seed=3`: argparse ends the positional list at the first flag,
    # so key=value words after a flag come back unparsed; they are overrides all the same.
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in word and not word.startswith("-") for word in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(getattr(args, "quiet", False), getattr(args, "debug", False))
    try:
        return args.func(args)
    except CompressError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept — rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's mistake: one clear line, the traceback under --debug
        if args.debug:
            raise
        where = getattr(exc, "compress_where", None)
        kept = "finished stages are kept (--resume continues). " if where else ""
        print(f"error: internal error{' in ' + where if where else ''}: {type(exc).__name__}: {exc}; {kept}"
              f"This is a bug: rerun with --debug to see the traceback, and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
