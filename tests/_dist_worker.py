"""Run under `torchrun --nproc_per_node 2`: the finetune stage and the loop on 2 CPU processes (gloo)."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def main(model_dir: str, csv: str, out: str) -> None:
    from compress.bundle import ModelBundle
    from compress.context import RunContext
    from compress.data import load_data, pad_collate
    from compress.recipe import DataSpec
    from compress.stages.finetune import Finetune, run_finetune

    rank = int(os.environ["RANK"])
    data = load_data(DataSpec(source=csv, label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification", seed=0)
    bundle = ModelBundle.load(model_dir)
    seen: list[int] = []
    train_set = data.tokenized("train", bundle.tokenizer)
    train_set = train_set.add_column("idx", list(range(len(train_set))))
    base_collate = pad_collate(bundle.tokenizer)

    def collate(rows):
        batch = base_collate(rows)
        batch["idx"] = torch.tensor([r["idx"] for r in rows])
        return batch

    def loss_fn(model, batch):
        seen.extend(batch.pop("idx").tolist())
        return model(**batch).loss

    from compress.training import TrainingFields, train

    model = bundle.model
    for p in model.parameters():
        p.requires_grad_(True)
    result = train(model, train_set, collate, TrainingFields(lr=1e-3, max_steps=4, batch_size=8),
                   device="cpu", seed=0, loss_fn=loss_fn, show_progress=False)
    # The stage itself, LoRA + merge, on both processes.
    stage = run_finetune(ModelBundle.load(model_dir), Finetune(method="lora", lr=5e-3, max_steps=6, batch_size=8),
                         RunContext(output_dir=Path(out), seed=0, device="cpu", data=data))
    digest = hashlib.sha256()
    for name, p in sorted(stage.bundle.model.state_dict().items()):
        digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    info = stage.facts
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "seen": seen, "loop_processes": result.num_processes, "loss_curve": info["loss_curve"],
        "stage_processes": info["num_processes"], "weights": digest.hexdigest(),
        "world": int(os.environ["WORLD_SIZE"])}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
