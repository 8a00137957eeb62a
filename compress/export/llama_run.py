"""Run llama.cpp's converter and tools on a GGUF file and read their answers.

Each call is one subprocess with a timeout; a failure raises StageError with the tool's last lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from compress.errors import StageError
from compress.export.llama_cpp import LlamaCppTools

TIMEOUT_S = 3600


def _run(args: list[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise StageError(f"gguf export: {what} did not finish in {TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise StageError(f"gguf export: {what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout + done.stderr


def convert(tools: LlamaCppTools, hf_folder: Path, out: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py, with the gguf-py of the same llama.cpp source."""
    _run([sys.executable, str(tools.converter), str(hf_folder), "--outfile", str(out), "--outtype", outtype],
         f"convert_hf_to_gguf.py --outtype {outtype}", env={"HF_HUB_OFFLINE": "1"})


def quantize(tools: LlamaCppTools, src: Path, out: Path, qtype: str, threads: int) -> None:
    """llama-quantize SRC OUT TYPE (llama.cpp's own k-quant/legacy quantization)."""
    _run([str(tools.tool("llama-quantize")), str(src), str(out), qtype, str(threads)], f"llama-quantize {qtype}")


def tokenize(tools: LlamaCppTools, model: Path, text_file: Path) -> list[int]:
    """The token ids llama.cpp reads `text_file` as (special tokens added as its tools add them)."""
    out = _run([str(tools.tool("llama-tokenize")), "-m", str(model), "-f", str(text_file), "--ids",
                "--no-escape", "--log-disable"], "llama-tokenize")
    found = re.findall(r"^\[[\d, ]*\]$", out, flags=re.MULTILINE)
    if not found:
        raise StageError(f"gguf export: llama-tokenize printed no token list: {out[-300:]!r}")
    return json.loads(found[-1])


def perplexity(tools: LlamaCppTools, model: Path, text_file: Path, ctx: int, chunks: int,
               threads: int) -> dict[str, Any]:
    """llama-perplexity over `chunks` chunks of `ctx` tokens (the second half of each chunk scored)."""
    out = _run([str(tools.tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(ctx),
                "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads), "--no-escape"], "llama-perplexity")
    final = re.search(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)", out)
    if not final:
        raise StageError(f"gguf export: llama-perplexity printed no final estimate: {out[-400:]!r}")
    used = re.search(r"calculating perplexity over (\d+) chunks", out)
    return {"ppl": float(final.group(1)), "chunks": int(used.group(1)) if used else None}


def bench(tools: LlamaCppTools, model: Path, prompt: int, decode: int, threads: int, repeats: int) -> dict[str, float]:
    """llama-bench prompt processing (pp) and decode (tg, from an empty context) tokens/s."""
    out = _run([str(tools.tool("llama-bench")), "-m", str(model), "-p", str(prompt), "-n", str(decode),
                "-t", str(threads), "-r", str(repeats), "-o", "json"], "llama-bench")
    rows = json.loads(out[out.index("["): out.rindex("]") + 1])
    result = {}
    for row in rows:
        key = "prefill" if row.get("n_prompt") else "decode"
        result[f"{key}_tokens_per_s"] = float(row["avg_ts"])
    return result


def read_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    return GGUFReader(str(path))


def gguf_field(reader: Any, key: str) -> Any:
    """A scalar or string metadata value of a GGUF file (None when absent)."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()
