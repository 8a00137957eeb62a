"""`compress plan`: per-stage peak memory per device from the model config alone (no weights)."""

from compress.plan.planner import MemoryPlan, plan_recipe
from compress.plan.render import render_plan

__all__ = ["MemoryPlan", "plan_recipe", "render_plan"]
