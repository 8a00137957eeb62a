"""Find, or build once and cache, llama.cpp's own tools for the GGUF export.

The GGUF export converts with llama.cpp's `convert_hf_to_gguf.py` and checks the file in llama.cpp
itself (`llama-perplexity`, `llama-bench`, `llama-quantize`; `llama-tokenize` gives PyTorch the
very tokens llama.cpp scored). The registry's prebuilt llama.cpp
wheels need a newer glibc/libstdc++ than many machines have, and a full `pip install
llama-cpp-python` build takes > 20 min on 2 cores, so we build only those four tools (≈3 min on 2
cores) from the llama.cpp source vendored in the `llama-cpp-python` source package, pinned below,
and cache them:

    <cache>/llama.cpp/<version>/bin/        llama-quantize, llama-perplexity, llama-bench, llama-tokenize
    <cache>/llama.cpp/<version>/convert/    convert_hf_to_gguf.py, conversion/, gguf-py/
    <cache>/llama.cpp/<version>/tools.json  what was built, from what, with which flags, how long

`<cache>` is $COMPRESS_CACHE or ~/.cache/compress. Build (or check) from a shell with
`python -m compress.export.llama_cpp build`; CI runs the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

# The llama-cpp-python source release whose vendored llama.cpp we build (sdist from PyPI).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-tokenize")
BUILD_COMMAND = "python -m compress.export.llama_cpp build"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",  # static: the binaries can be copied alone
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",  # no network code: the tools only read local files
)
# What the converter needs from the source tree (the rest is C++ for the build).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
STAMP = "tools.json"


@dataclass(frozen=True)
class LlamaCppTools:
    """Paths of a usable llama.cpp build: its three tools and its HF → GGUF converter."""

    root: Path

    def tool(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def converter(self) -> Path:
        return self.root / "convert" / "convert_hf_to_gguf.py"

    def info(self) -> dict:
        """The stamp written by the build (version, flags, seconds)."""
        try:
            return json.loads((self.root / STAMP).read_text())
        except (OSError, ValueError):
            return {}


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def tools_root(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / "llama.cpp" / version


def find_tools(version: str = LLAMA_CPP_PYTHON_VERSION) -> LlamaCppTools | None:
    """The cached build when it is complete (every tool executable, the converter present), else None.
    $COMPRESS_LLAMA_CPP may point at another folder with the same layout."""
    root = Path(os.environ["COMPRESS_LLAMA_CPP"]) if os.environ.get("COMPRESS_LLAMA_CPP") else tools_root(version)
    tools = LlamaCppTools(root)
    if all(os.access(tools.tool(name), os.X_OK) for name in TOOLS) and tools.converter.is_file():
        return tools
    return None


def converter_architectures(tools: LlamaCppTools) -> set[str]:
    """The Hugging Face architectures (config.json `architectures`) the converter registers, read from
    its source text (`@ModelBase.register("LlamaForCausalLM", ...)`) so that no torch import is needed."""
    found: set[str] = set()
    for path in (tools.root / "convert").rglob("*.py"):
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", path.read_text(errors="replace")):
            found.update(re.findall(r'"([A-Za-z0-9_]+)"', args))
    return found


def missing_tools_message() -> str:
    """One line for a refusal: what is missing and the command that builds it."""
    root = os.environ.get("COMPRESS_LLAMA_CPP") or str(tools_root())
    return (f"the gguf export needs llama.cpp's tools ({', '.join(TOOLS)}) and converter in {root}, which are "
            f"not built; build them once (≈3 min on 2 cores, needs cmake, ninja and a C++ compiler) with: "
            f"{BUILD_COMMAND}")


def source_dir(version: str = LLAMA_CPP_PYTHON_VERSION, download: bool = True) -> Path:
    """The llama.cpp source vendored in the llama-cpp-python sdist: unpacked under <cache>/src, unpacking
    the sdist found there, or fetching it from the package index first (`pip download`)."""
    src = cache_root() / "src"
    unpacked = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (unpacked / "CMakeLists.txt").is_file():
        return unpacked
    tarball = src / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        if not download:
            raise FileNotFoundError(f"no llama-cpp-python {version} source in {src}")
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "--dest", str(src), f"llama-cpp-python=={version}"], check=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(src, filter="data")  # "data": no absolute paths, links or devices outside src
    if not (unpacked / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"{tarball} has no vendor/llama.cpp/CMakeLists.txt")
    return unpacked


def build_tools(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None,
                force: bool = False) -> LlamaCppTools:
    """Build the tools into the cache (a no-op when they are there, unless `force`)."""
    found = find_tools(version)
    if found is not None and not force and not os.environ.get("COMPRESS_LLAMA_CPP"):
        return found
    for program in ("cmake", "ninja"):
        if shutil.which(program) is None:
            raise RuntimeError(f"building llama.cpp needs {program}; install it (`pip install {program}` "
                               f"or your system's package), then run {BUILD_COMMAND}")
    source = source_dir(version)
    root = tools_root(version)
    build = root / "build"
    jobs = jobs or max(1, min(os.cpu_count() or 1, 4))
    start = time.monotonic()
    subprocess.run(["cmake", "-G", "Ninja", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True)
    subprocess.run(["ninja", "-C", str(build), f"-j{jobs}", *TOOLS], check=True)
    seconds = time.monotonic() - start
    # Install by copy into a fresh folder, then rename, so a half-finished build never looks usable.
    staging = root / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    (staging / "convert").mkdir()
    for name in TOOLS:
        shutil.copy2(build / "bin" / name, staging / "bin" / name)
    for part in CONVERTER_PARTS:
        copy = shutil.copytree if (source / part).is_dir() else shutil.copy2
        copy(source / part, staging / "convert" / part)
    stamp = {"llama_cpp_python": version, "tools": list(TOOLS), "cmake_flags": list(CMAKE_FLAGS),
             "jobs": jobs, "build_seconds": round(seconds, 1), "source": str(source)}
    (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    for part in ("bin", "convert", STAMP):
        old = root / part
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    for part in ("convert", STAMP, "bin"):  # bin last: find_tools() checks it first
        (staging / part).rename(root / part)
    staging.rmdir()
    return LlamaCppTools(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.export.llama_cpp",
                                     description="Build or locate llama.cpp's tools for the gguf export.")
    parser.add_argument("action", choices=("build", "where"))
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: cores, ≤ 4)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a build is cached")
    args = parser.parse_args(argv)
    if args.action == "where":
        found = find_tools()
        print(found.root if found else missing_tools_message())
        return 0 if found else 1
    tools = build_tools(jobs=args.jobs, force=args.force)
    print(f"llama.cpp tools in {tools.root}: {json.dumps(tools.info())}")
    return 0


__all__ = [
    "BUILD_COMMAND",
    "LLAMA_CPP_PYTHON_VERSION",
    "TOOLS",
    "LlamaCppTools",
    "build_tools",
    "converter_architectures",
    "find_tools",
    "missing_tools_message",
    "source_dir",
]

if __name__ == "__main__":
    raise SystemExit(main())
