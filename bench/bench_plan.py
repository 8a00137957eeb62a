"""Memory plans for Llama-2 7B / 13B / 70B and LLaMA 65B, against the QLoRA paper and accelerate.

Every figure is `compress plan` on recipes/plan/llama-2-7b-qlora.yaml (batch 1 x 512 tokens, gradient
checkpointing, rank-64 LoRA on every linear layer, bf16 weights, a CUDA target), with the model and
method swapped by the same `--set` overrides a user types; the full fine-tuning column adds
`--world-size 8 --shard zero3`. Nothing is downloaded: the models are built on the meta device from
the config.json files in compress/configs/.

    python -m bench.bench_plan        # a few seconds; writes reports/memory-plan.md
"""

from __future__ import annotations

from bench.common import REPORTS
from compress.plan import plan_recipe
from compress.recipe import load_recipe

RECIPE = "recipes/plan/llama-2-7b-qlora.yaml"
MODELS = {"llama-2-7b": "Llama-2 7B", "llama-2-13b": "Llama-2 13B", "llama-2-70b": "Llama-2 70B",
          "llama-65b": "LLaMA 65B"}
# QLoRA paper (arXiv:2305.14314) Figure 6: QLoRA total at batch 1 x 512, gradient checkpointing, r=64 on
# every linear layer (LLaMA-1; the 7B and 13B have the same shapes as Llama-2's).
PAPER_QLORA_GB = {"llama-2-7b": 6.9, "llama-2-13b": 11.3, "llama-65b": 45.0}
GIB = 2**30


def _plan(model: str, method: str, **kwargs):
    overrides = [f"model.path=pkg:compress/configs/{model}", f"stages[0].method={method}"]
    if method == "full":
        overrides.append("stages[0].optimizer=adamw")
    return plan_recipe(load_recipe(RECIPE, overrides), device="cuda", check_devices=False, **kwargs)


def main() -> None:
    rows = [("| model | parameters | QLoRA (1 GPU) | QLoRA, paper Fig. 6 | difference | LoRA bf16 (1 GPU) | "
             "full, ZeRO-3 on 8 GPUs (per GPU) | accelerate: bf16 weights / 'Training using Adam' bf16 |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, title in MODELS.items():
        qlora, lora = _plan(model, "qlora"), _plan(model, "lora")
        full = _plan(model, "full", world_size=8, shard="zero3")
        paper = PAPER_QLORA_GB.get(model)
        diff = f"{(qlora.peak / GIB / paper - 1) * 100:+.1f}%" if paper else "—"
        acc = qlora.accelerate
        rows.append(f"| {title} | {qlora.params / 1e9:.2f} B | {qlora.peak / GIB:.2f} GiB | "
                    f"{f'{paper} GB' if paper else '—'} | {diff} | {lora.peak / GIB:.2f} GiB | "
                    f"{full.peak / GIB:.2f} GiB | {acc['total_16bit'] / GIB:.2f} / {acc['adam_16bit'] / GIB:.2f} GiB |")
    columns = ("weights", "adapters", "gradients", "optimizer", "fp32 master weights", "gathered block",
               "activations")
    parts = [f"| model | method | {' | '.join(columns)} |", "|---|---|" + "---:|" * len(columns)]
    for model, title in MODELS.items():
        for method, kwargs in (("qlora", {}), ("lora", {}), ("full", {"world_size": 8, "shard": "zero3"})):
            stage = _plan(model, method, **kwargs).stages[0].parts
            cells = [f"{stage[k] / GIB:.2f}" if k in stage else "—" for k in columns]
            parts.append(f"| {title} | {method} | " + " | ".join(cells) + " |")
    text = "\n".join([
        "# Memory plans (`compress plan`)", "",
        "Written by `python -m bench.bench_plan`: `compress plan " + RECIPE + " --set model.path=... "
        "--set stages[0].method=...` (full fine-tuning: `--set stages[0].optimizer=adamw --world-size 8 "
        "--shard zero3`). Batch 1 x 512 tokens, gradient checkpointing, rank-64 LoRA on every linear "
        "layer, bf16 weights and autocast, CUDA target. Estimates from the config alone; GiB = 2^30 bytes.",
        "", "## Peak per device", "", *rows, "",
        ("accelerate's columns apply `accelerate.commands.estimate` (`calculate_maximum_sizes`, "
         "`estimate_training_usage`) to the same meta model; its 'Training using Adam' is the largest of "
         "its model / gradient / optimizer terms for full fine-tuning on one device, without activations."),
        "", "## Parts (GiB per device)", "", *parts, ""])
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "memory-plan.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
