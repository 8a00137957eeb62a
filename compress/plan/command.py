"""`compress plan RECIPE`: the command line side of the memory plan (parse, plan, print, exit code)."""

from __future__ import annotations

import argparse
from typing import Any

from compress.errors import RecipeError


def parse_size(text: str) -> int:
    """'48GiB', '80GB', '512MiB' or plain bytes -> bytes (GB = 10^9, GiB = 2^30)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise RecipeError(f"--device-memory: {text!r} is not a size; write e.g. 48GiB, 80GB or 24000MiB")
    unit = (match.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def cmd_plan(args: argparse.Namespace) -> int:
    from compress.plan import plan_recipe, render_plan
    from compress.recipe import load_recipe

    device_memory = parse_size(args.device_memory) if args.device_memory else None
    recipe = load_recipe(args.recipe, args.set)
    plan = plan_recipe(recipe, device=args.device, world_size=args.world_size, shard=args.shard,
                       check_devices=device_memory is None)
    print(render_plan(plan, device_memory))
    limit = device_memory if device_memory is not None else (
        min(d.total for d in plan.devices) if plan.devices else None)
    return 3 if limit is not None and plan.peak > limit else 0


def add_parser(sub: Any) -> None:
    """Register `plan` on the `compress` sub-command parser."""
    p = sub.add_parser("plan", help="estimate each stage's peak memory per device from the model config "
                                     "(no weights loaded); exit 3 when a stage does not fit")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override before planning")
    p.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: the recipe's)")
    p.add_argument("--world-size", type=int, default=1, help="devices the training stages run on (default 1)")
    p.add_argument("--shard", choices=["none", "zero2", "zero3", "fsdp"], default="none",
                   help="how training state is split over --world-size devices (default: none, i.e. DDP; "
                        "a stage's own deepspeed/fsdp settings count when none)")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="check the fit against a device of this size (e.g. 48GiB, 80GB) instead of those here")
    p.set_defaults(func=cmd_plan)
