"""`compress` command line: thin — parse, call the Python API, print. Exit 2: bad input; 1: failed run."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from compress.errors import CompressError, RecipeError


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("compress: %(message)s"))
    logger = logging.getLogger("compress")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # Library chatter (weight-init notices, tokenizer hints) drowns the run's own log.
    import transformers

    transformers.logging.set_verbosity_error()


def cmd_run(args: argparse.Namespace) -> int:
    from compress.runner import run

    report = run(args.recipe, args.overrides, output_dir=args.output_dir, resume=args.resume,
                 overwrite=args.overwrite, show_progress=not args.quiet)
    out = args.output_dir or report.recipe.get("output_dir") or f"runs/{report.name}"
    print(f"done: {out}/report.md")
    base, final = report.baseline, report.final
    if base and final and final is not base:
        from compress.report.render import comparison_rows

        header, rows = comparison_rows(report)
        for row in rows:
            print("  " + "  ".join(f"{h}={v}" for h, v in zip(header, row, strict=True)))
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
    from pydantic_core import PydanticUndefined

    from typing import Literal, get_args, get_origin

    if get_origin(field.annotation) is Literal:
        annotation = " | ".join(repr(a) for a in get_args(field.annotation))
    else:
        annotation = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    default = "required" if field.default is PydanticUndefined and field.default_factory is None else (
        f"default {field.default!r}" if field.default_factory is None else "default: built")
    help_text = field.description or ""
    return f"    {name}: {annotation} ({default}) {help_text}".rstrip()


def cmd_stages(args: argparse.Namespace) -> int:
    from compress.registry import stage_entries

    for entry in sorted(stage_entries(), key=lambda e: e.type):
        print(f"{entry.type}: {entry.summary}")
        for name, field in entry.config_cls.model_fields.items():
            if name != "type":
                print(_describe_field(name, field))
        print()
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
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check recipes without loading models or data")
    p.add_argument("files", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override before checking")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("stages", help="list stage types with their fields, defaults and help")
    p.set_defaults(func=cmd_stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
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


if __name__ == "__main__":
    sys.exit(main())
