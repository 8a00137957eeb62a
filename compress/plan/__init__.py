"""`compress plan`: per-stage peak memory per device from the model config alone (no weights).

Exports load on first use, so registering the `plan` command does not import torch for every
`compress` invocation.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MemoryPlan", "plan_recipe", "render_plan"]


def __getattr__(name: str) -> Any:
    if name in ("MemoryPlan", "plan_recipe"):
        from compress.plan import planner

        return getattr(planner, name)
    if name == "render_plan":
        from compress.plan.render import render_plan

        return render_plan
    raise AttributeError(f"module 'compress.plan' has no attribute {name!r}")
