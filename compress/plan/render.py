"""Text for `compress plan`: a table of each phase's peak per device, its parts, and the fit."""

from __future__ import annotations

from compress.plan.planner import MemoryPlan


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def fit_word(fits: bool | None) -> str:
    return "no device here" if fits is None else ("fits" if fits else "DOES NOT FIT")


def render_plan(plan: MemoryPlan, device_memory: int | None = None) -> str:
    """The plan as plain text. `device_memory` checks against a device of that size instead of those here."""
    shard = (f", {plan.sharding.mode} over {plan.sharding.world_size} devices"
             if plan.sharding.world_size > 1 else "")
    lines = [(f"memory plan for {plan.model}: {plan.params:,} parameters, {plan.dtype} weights, "
              f"on {plan.device}{shard} (estimates from the config; GiB = 2^30 bytes)")]
    if device_memory is not None:
        lines.append(f"checked against a device of {gib(device_memory)} (--device-memory)")
    else:
        for d in plan.devices:
            lines.append(f"device {d.name}: {gib(d.total)} total, {gib(d.available)} available")
        if not plan.devices:
            lines.append(f"no {plan.device} device here: nothing to check the fit against "
                         f"(give --device-memory SIZE to check one)")
    width = max(len(s.label) for s in plan.stages) if plan.stages else 5
    lines.append("")
    lines.append(f"{'phase'.ljust(width)}  {'peak/device':>13}  fit")
    for stage in plan.stages:
        fits = stage.peak <= device_memory if device_memory is not None else plan.fits(stage)
        lines.append(f"{stage.label.ljust(width)}  {gib(stage.peak):>13}  {fit_word(fits)}")
    for stage in plan.stages:
        lines.append("")
        lines.append(f"{stage.label}: {gib(stage.peak)}")
        for part, n in sorted(stage.parts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {part:<24} {gib(n):>13}")
        lines.extend(f"  - {note}" for note in stage.notes)
    acc = plan.accelerate
    if acc:
        lines.append("")
        lines.append(f"accelerate estimate-memory (same meta model): fp32 {gib(acc['total_fp32'])}, 16-bit "
                     f"{gib(acc['total_16bit'])}, largest layer {gib(acc['largest_layer_fp32'])} (fp32); "
                     f"'Training using Adam' fp32 {gib(acc['adam_fp32'])}, bf16 {gib(acc['adam_16bit'])}")
    lines.extend(f"note: {n}" for n in plan.notes)
    lines.append("not counted: the process itself (Python, torch, the CUDA context: typically 0.5-1 GiB) and "
                 "allocator fragmentation; leave that much headroom")
    return "\n".join(lines)
