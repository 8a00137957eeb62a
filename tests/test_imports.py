"""Every module imports on its own: no import cycle that works only in one import order."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compress"

# Each module is imported with every compress module forgotten first, so a module that needs another
# to be imported before it (a cycle broken only by import order) fails here. Third-party modules stay
# loaded, which keeps the whole check to a few seconds.
SCRIPT = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "compress" or m.startswith("compress.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_on_its_own():
    modules = _modules()
    assert len(modules) > 60 and "compress.specs" in modules
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_spec_and_data_modules_do_not_import_the_stages():
    code = ("import sys, compress.specs, compress.data, compress.loading, compress.evaluate.point; "
            "print(sorted(m for m in sys.modules if m.startswith(('compress.stages', 'compress.recipe'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
