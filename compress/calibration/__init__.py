"""The one calibration pipeline: what every calibrated method (Wanda, SparseGPT, GPTQ, SmoothQuant,
activation/Taylor importance) runs the model on, and how it measures what the layers see.

- blocks.py   `calibration_samples` = the number of tokenised blocks of up to `max_length` tokens,
              drawn with the stage's seed; only the drawn documents are tokenised
- forward.py  the forward pass over calibration batches and the activation hooks (real tokens only):
              input-channel norms (Wanda), Hessians XᵀX / n (SparseGPT, GPTQ), absolute maxima

The damped Hessian and its Cholesky-factored inverse live in compress/hessian.py.
"""

from compress.calibration.blocks import (
    batch_rows,
    batch_tokens,
    calibration_batches,
    calibration_blocks,
    draw_order,
)
from compress.calibration.forward import (
    InputStats,
    Tokens,
    forward_all,
    forward_hooks,
    hessian_hooks,
    input_hessians,
    input_norms,
    input_stats,
    to_device,
)

__all__ = ["InputStats", "Tokens", "batch_rows", "batch_tokens", "calibration_batches", "calibration_blocks",
           "draw_order", "forward_all", "forward_hooks", "hessian_hooks", "input_hessians", "input_norms",
           "input_stats", "to_device"]
