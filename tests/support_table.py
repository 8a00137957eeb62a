"""Run the architecture matrix and write the README's support table from what it found.

    python -m tests.support_table            # every cell (~5 min on 2 cores), then rewrite README.md
    python -m tests.support_table --dry-run  # print the table, write nothing

The table is written only when every cell behaves as tests/architecture_cases.py declares, so the
README never claims more than the tests assert (tests/test_architectures.py checks the committed
block equals the declared table).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from compress.testing import TINY_ARCHITECTURES
from tests.architecture_cases import CASES, PENDING, REFUSED, Assets, check_promise, outcome, run_stage

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
MARK = {"supported": "✓", "refused": "—", "pending": "…"}


def render(outcomes: dict[tuple[str, str], str]) -> str:
    """The Markdown block: one row per architecture, one column per case, then the refusal reasons."""
    archs, cases = list(TINY_ARCHITECTURES), list(CASES)
    lines = ["| architecture | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for arch in archs:
        lines.append(f"| {arch} | " + " | ".join(MARK[outcomes[arch, c]] for c in cases) + " |")
    legend = "✓ runs, saves, reloads and keeps its promise (tested); — refused with a message before any work"
    legend += "; … a known issue #14 bug, being fixed" if PENDING else ""
    lines += ["", legend + ". Refusals:", ""]
    reasons: dict[str, list[str]] = {}
    for (arch, case), (_, why) in REFUSED.items():
        reasons.setdefault(why, []).append(f"{arch} {case}")
    lines += [f"- {', '.join(cells)}: {why}" for why, cells in reasons.items()]
    waiting: dict[str, list[str]] = {}
    for (arch, case), why in PENDING.items():
        waiting.setdefault(why, []).append(f"{arch} {case}")
    lines += [f"- pending, {', '.join(cells)}: {why}" for why, cells in waiting.items()]
    return "\n".join(lines)


def declared() -> dict[tuple[str, str], str]:
    return {(a, c): outcome(a, c) for a in TINY_ARCHITECTURES for c in CASES}


def measure(root: Path) -> dict[tuple[str, str], str]:
    """Run every cell; what it did: supported, refused or failed (with the error)."""
    from compress.errors import CompressError

    assets = Assets(root)
    found = {}
    for arch in TINY_ARCHITECTURES:
        for case in CASES:
            work = root / "cells" / f"{arch}-{case.replace(':', '')}"
            try:
                before, out = run_stage(assets, arch, case, work)
                check_promise(before, out, case, work / "out")
                found[arch, case] = "supported"
            except CompressError as exc:
                found[arch, case] = "refused"
                print(f"{arch} {case}: refused: {str(exc)[:200]}", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - a failing cell is reported, not fatal
                found[arch, case] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                print(f"{arch} {case}: {found[arch, case]}", file=sys.stderr)
    return found


def write_readme(block: str) -> None:
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{README}: no {START} … {END} block to rewrite")
    README.write_text(pattern.sub(lambda _: f"{START}\n{block}\n{END}", text), encoding="utf-8")


def committed_block() -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = measure(Path(tmp))
    expected = declared()
    wrong = {cell: (got, expected[cell]) for cell, got in found.items()
             if got != expected[cell] and not (expected[cell] == "pending" and got != "supported")}
    for (arch, case), (got, want) in sorted(wrong.items()):
        print(f"MISMATCH {arch} {case}: declared {want}, got {got}")
    block = render(expected)
    print(block)
    if wrong:
        print(f"{len(wrong)} cell(s) differ from tests/architecture_cases.py; README not written")
        return 1
    if not args.dry_run:
        write_readme(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
