"""int8 weights x int8 activations quantized at run time: the CPU speed path.

The matmul is PyTorch's fbgemm/x86 dynamic kernel (`torch.ops.quantized.linear_dynamic`), the one
behind `torch.ao.quantization.quantize_dynamic`. Measured on this machine for a 4096x384x1536
matmul: fp32 49 ms, fbgemm dynamic 21 ms, torch._int_mm 44-107 ms, torchao's
Int8DynamicActivationInt8Weight 179 ms. The module keeps its weight as plain int8 codes and fp32
per-channel scales (so it saves to safetensors and reloads exactly) and packs them for fbgemm
when built or loaded. Once packed, the plain codes are dropped and read back from the packed copy when
asked for (saving, size accounting, export): holding both made the loaded model 1.3x the memory its
tensors account for (reports/memory.md).

fbgemm quantizes each activation tensor with one scale, so one outlier token (BERT-style models
put huge activations on [CLS]/[SEP]) eats the int8 range of every other token in the batch.
`per_token` divides each token's row by its own absolute maximum before the kernel and
multiplies the output row back afterwards (exact, since a linear map is homogeneous; the bias is
added after), which gives per-token activation scales, as torchao's W8A8 uses, on the fbgemm
kernel. An optional per-input-channel smoothing vector (SmoothQuant, Xiao et al. 2023) instead
moves channel outliers into the weight: y = (x / s) @ (W * s)^T, s from calibration activations.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from compress.quant.kinds import register_layer_kind


def kernel_available() -> str | None:
    """None when the fbgemm/x86 dynamic kernel can run here, else why not."""
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "qnnpack")):
        return f"this torch build has no quantized CPU engine (engines: {engines})"
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return "this torch build has no quantized.linear_dynamic kernel"
    return None


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1-alpha), per input channel j."""
    w_max = weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


@register_layer_kind
class DynamicInt8Linear(nn.Module):
    kind = "int8-dynamic"

    def __init__(self, in_features: int, out_features: int, bias: bool, smooth: bool = False,
                 per_token: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.per_token = per_token
        codes = torch.zeros(out_features, in_features, dtype=torch.int8)
        self.qweight = nn.Parameter(codes, requires_grad=False)
        self.qweight.quant_shape = (out_features, in_features)
        self.register_buffer("scales", torch.ones(out_features))
        # 1/s per input channel; x is multiplied by it before the activation is quantized.
        if smooth:
            self.register_buffer("smooth_inv", torch.ones(in_features))
        else:
            self.smooth_inv = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: Any = None
        # Loaded codes are packed at once (the packed copy of earlier codes goes): the packing's transient
        # copies then belong to the load, not to the first forward's peak memory.
        self.register_load_state_dict_post_hook(lambda module, _keys: module.pack())

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None,
                    per_token: bool = False) -> DynamicInt8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, smooth is not None,
                    per_token)
        w = linear.weight.detach().float().cpu()
        if smooth is not None:
            w = w * smooth.unsqueeze(0)
            layer.smooth_inv.copy_(1.0 / smooth)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        layer.qweight.data.copy_(torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8))
        layer.scales.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        layer.pack()
        return layer

    def codes(self) -> torch.Tensor:
        """The int8 codes (out, in): the held tensor, or read back exactly from fbgemm's packed copy."""
        if self._packed is None or self.qweight.numel():
            return self.qweight.data
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def pack(self) -> None:
        """Pack the codes for fbgemm and keep only the packed copy (no-op where the kernel is missing,
        so a saved model can still be loaded and inspected there; its forward then says why)."""
        if self.qweight.numel() and kernel_available() is None:
            self._packed = self._pack()
            self._release_codes()

    def _release_codes(self) -> None:
        # The Parameter object stays (its logical shape in `quant_shape` keeps parameter counts right);
        # only its storage goes. `_save_to_state_dict` and `codes()` read the packed copy instead.
        self.qweight.data = torch.empty(0, dtype=torch.int8)

    def read_back(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, the tensor it stands for) for parameters held in another form: the released codes.
        Size measurement (`compress.evaluate.size`) counts and reads those instead of the empty holder."""
        return [] if self.qweight.numel() else [(self.qweight, self.codes())]

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.qweight.numel():
            destination[prefix + "qweight"] = self.codes()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if not self.qweight.numel():  # released: give the codes their storage back to load into
            self.qweight.data = self.codes().clone()
            self._packed = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _pack(self) -> Any:
        # torch marks quantized tensors deprecated (moving to torchao), but torchao has no fast CPU
        # int8 path yet; `kernel_available` and the check report it if a future torch drops them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            q = torch._make_per_channel_quantized_tensor(
                self.codes(), self.scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
        # Per-token mode rescales the kernel's output, so the bias is added afterwards instead.
        bias = None if self.bias is None or self.per_token else self.bias.data.float()
        return torch.ops.quantized.linear_prepack(q, bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, smoothing undone (for code that inspects `.weight`; not stored)."""
        w = self.codes().float() * self.scales.unsqueeze(1)
        return w if self.smooth_inv is None else w * self.smooth_inv.unsqueeze(0)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "smooth": self.smooth_inv is not None,
                "per_token": self.per_token}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DynamicInt8Linear:
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["smooth"],
                   spec.get("per_token", False))

    def size_facts(self) -> tuple[int, int, str, float]:
        # int8 codes + one fp32 scale per output row (+ one fp32 smoothing factor per input column)
        limit = 8 + 32 / self.in_features + (32 / self.out_features if self.smooth_inv is not None else 0)
        return self.out_features, self.in_features, self.kind, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("int8-dynamic layers run on CPU only (fbgemm kernels)")
        if self._packed is None:
            self.pack()
            if self._packed is None:  # pack() leaves the codes unpacked when the kernel is missing
                why = kernel_available() or "no packed weights"
                raise RuntimeError(f"int8-dynamic layers cannot run here: {why}; load the model on a torch "
                                   "build with the fbgemm/x86 quantized engine")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.smooth_inv is not None:
            x2 = x2 * self.smooth_inv
        # reduce_range=True: x86 kernels accumulate u8*s8 pairs in int16, so activations use 7 bits.
        if self.per_token:
            rows = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            y = torch.ops.quantized.linear_dynamic((x2 / rows).contiguous(), self._packed, True) * rows
            if self.bias is not None:
                y = y + self.bias
        else:
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._packed, True)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, per_token={self.per_token}, "
                f"smooth={self.smooth_inv is not None}")
