"""How much the loss feels each output channel of a layer: the mean squared loss gradient at the layer's
outputs over the real calibration tokens (the diagonal of the empirical Fisher in output space).

A second-order Taylor expansion of the loss with the Fisher for its Hessian gives the loss increase of an
output perturbation δy as ½ Σ_i E[g_i²] E[δy_i²] (gradient and perturbation taken independent); with
E[δy_i²] = (ΔW H ΔWᵀ)_ii from the input Hessian H, a layer's quantization costs the loss
½ Σ_i F_i (ΔW H ΔWᵀ)_ii. One forward and one backward pass over the calibration data serve every layer;
only activation gradients are computed (the parameters are frozen for the pass).
"""

from __future__ import annotations

from typing import Any

import torch

from compress.calibration.forward import Tokens, to_device
from compress.errors import StageError


def output_grad_sq(model: Any, modules: dict[str, torch.nn.Module], batches: list[dict[str, torch.Tensor]],
                   field: str = "calibration_samples") -> dict[str, torch.Tensor]:
    """Per module, E[(∂L/∂y_i)²] over the real tokens, one value per output channel (float32, CPU).

    L is the model's own loss on the batch's labels, summed over tokens (the mean the model returns,
    times its real tokens), so every token's gradient counts fully. Raises StageError when the model
    returns no loss (no labels in the calibration data)."""
    sums: dict[str, torch.Tensor] = {}
    rows = dict.fromkeys(modules, 0)
    tokens = Tokens()

    def make(name: str):
        # A hook on the output tensor rather than a module backward hook: those wrap the output in a
        # view that in-place ops of some architectures refuse.
        def on_grad(grad: torch.Tensor) -> None:
            g = tokens.real(grad.detach()).float()
            sq = (g * g).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq
            rows[name] += g.shape[0]

        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(on_grad)
        return hook

    device = next(model.parameters()).device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    embeddings = model.get_input_embeddings()
    was_training = model.training
    handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
    # The embedding output is the leaf the backward starts from; no parameter gradient is kept.
    handles.append(embeddings.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                inputs = to_device(batch, device, labels=True)
                tokens.mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
                out = model(**inputs)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise StageError(f"{field}: measuring sensitivity needs the model's loss on the "
                                     f"calibration data, but it returned none (no labels); use sensitivity: "
                                     f"output-error")
                real = int(tokens.mask.sum()) if tokens.mask is not None else inputs["input_ids"].numel()
                (loss * real).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: (s / max(rows[n], 1)).cpu() for n, s in sums.items()}
