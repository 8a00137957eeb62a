"""The layer-input Hessian H = XᵀX / n and its damped, Cholesky-factored inverse: the core GPTQ and
SparseGPT share.

Both algorithms (Frantar et al. 2023, and Frantar & Alistarh 2023, following IST-DASLab's reference
code) visit a weight's columns left to right and spread each column's rounding or pruning error onto
the columns not yet visited through the upper Cholesky factor of H⁻¹. Written once here so the two
cannot drift: the dead-input rule, the damping and the factorisation are the same numbers for both.
"""

from __future__ import annotations

import torch


class HessianError(ValueError):
    """H is not positive definite even after damping (raise the damping, or calibrate on more data)."""


class HessianSum:
    """Running XᵀX and row count over a layer's inputs; `mean()` is H = XᵀX / n.

    Summed in float64: 128 blocks of 2k tokens add ~250k outer products per entry, which float32 would
    round visibly; the mean is handed out in float32, the precision the algorithms work in.
    """

    def __init__(self, features: int, device: torch.device | str = "cpu", diagonal: bool = False):
        # `diagonal`: only diag(XᵀX), the per-channel sums of squares (Wanda's ||X_j||² up to n): features
        # numbers instead of features², and no matrix product.
        shape = (features,) if diagonal else (features, features)
        self.sum = torch.zeros(*shape, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of `x` (rows, features): one input vector per real token."""
        x64 = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.sum += (x64 * x64).sum(0) if self.sum.dim() == 1 else x64.T @ x64
        self.rows += x64.shape[0]

    def mean(self) -> torch.Tensor:
        """H = XᵀX / n (float32), or its diagonal; all zeros when no input was seen."""
        return (self.sum / max(self.rows, 1)).float()


def damped_inverse_factor(weight: torch.Tensor, hessian: torch.Tensor, damp: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepare an (out, in) weight for column-by-column error compensation under its input Hessian.

    Inputs that never fired (zero diagonal) get H_jj = 1 and their weights are zeroed: they cannot
    affect the output. `damp` times the mean diagonal is added to the diagonal so the factorisation is
    stable. Returns (W as a float32 copy with dead columns zeroed, U the upper Cholesky factor of the
    damped H⁻¹, dead (in,) bool). Raises HessianError when H is not positive definite.
    """
    W = weight.detach().float().contiguous().clone()  # Conv1D hands in a transposed view
    H = hessian.detach().to(W.device).float().clone()
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise HessianError(f"Hessian has shape {tuple(H.shape)}, the weight has {cols} inputs")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as exc:  # torch's LinAlgError: not positive definite (or NaN inputs)
        raise HessianError(f"Hessian is not positive definite ({exc})") from None
    return W, U, dead
