"""What bench/bench_peer.py and its two workers exchange: the calibration blocks (one file both read,
so compress and llm-compressor see the same tokens), each worker's result file, and where the peer's
python lives.

Standard library only: the llm-compressor worker (bench/peer_llmc.py) imports this module from its own
virtual environment, which has neither compress nor compress's pinned transformers.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

PEER_PYTHON_ENV = "COMPRESS_PEER_PYTHON"
DEFAULT_PEER_PYTHON = Path("/work/venvs/llmc/bin/python")
BLOCKS_FORMAT = "compress-calibration-blocks/1"
# What every worker's result.json must hold (the worker adds what else it knows).
RESULT_KEYS = ("tool", "method", "stage_seconds", "stage_cpu_seconds", "threads")


def write_blocks(path: Path, blocks: list[list[int]], meta: dict[str, Any]) -> None:
    """Write token blocks (all of one length) with `meta` (where they came from) as JSON."""
    check_blocks(blocks)
    path.write_text(json.dumps({"format": BLOCKS_FORMAT, "meta": meta, "blocks": blocks}))


def check_blocks(blocks: Any) -> None:
    """Raise ValueError unless `blocks` is a non-empty list of equally long, non-empty lists of token ids."""
    if not isinstance(blocks, list) or not blocks:
        raise ValueError("calibration blocks: expected a non-empty list of token-id lists")
    length = len(blocks[0]) if isinstance(blocks[0], list) else 0
    for i, block in enumerate(blocks):
        if not isinstance(block, list) or len(block) != length or length == 0:
            raise ValueError(f"calibration blocks: block {i} is not a list of {length or 'some'} token ids "
                             f"(every block must have the first block's length; unpadded blocks only)")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in block):
            raise ValueError(f"calibration blocks: block {i} holds something other than non-negative ints")


def read_blocks(path: Path) -> tuple[list[list[int]], dict[str, Any]]:
    """The blocks and meta `write_blocks` wrote; ValueError for any other file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != BLOCKS_FORMAT:
        raise ValueError(f"{path}: not a calibration-blocks file (format {BLOCKS_FORMAT!r} expected)")
    check_blocks(data["blocks"])
    return data["blocks"], data.get("meta", {})


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A worker's result (checked as `read_result` will check it), written as JSON."""
    check_result(result, str(path))
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def check_result(result: Any, where: str) -> None:
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise ValueError(f"{where}: worker result lacks {', '.join(missing)}")
    for key in ("stage_seconds", "stage_cpu_seconds"):
        value = result[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{where}: {key} is {value!r}, not a positive number of seconds")


def read_result(path: Path) -> dict[str, Any]:
    """A worker's result.json, checked; ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: the worker wrote no result (see its log beside it)")
    result = json.loads(path.read_text())
    check_result(result, str(path))
    return result


def peer_python(environ: dict[str, str] | None = None) -> Path:
    """The llm-compressor venv's python: $COMPRESS_PEER_PYTHON, else /work/venvs/llmc/bin/python.

    Raises FileNotFoundError with the install commands when it is not there."""
    environ = os.environ if environ is None else environ
    path = Path(environ.get(PEER_PYTHON_ENV) or DEFAULT_PEER_PYTHON)
    if not path.is_file():
        raise FileNotFoundError(
            f"llm-compressor's python not found at {path}. Install it in its own venv: "
            f"python -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install torch==2.13.0 && "
            f"/work/venvs/llmc/bin/pip install 'llmcompressor==0.14.*' — or set {PEER_PYTHON_ENV} to a "
            f"python that has llmcompressor 0.14.")
    return path


def pair_ratios(rows: list[dict[str, Any]], key: str = "stage_seconds") -> list[float]:
    """compress / peer for each back-to-back pair of one method (rows carry 'round' and 'tool')."""
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["tool"]] = row[key]
    return [r["compress"] / r["llmcompressor"] for _, r in sorted(by_round.items())
            if "compress" in r and "llmcompressor" in r]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
