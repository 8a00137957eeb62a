"""compress's own int4 weight-only layers written into an ONNX graph as `MatMulNBits`, codes as they are.

compress's int4 layout (compress/quant/weight_only.py) is ONNX Runtime's MatMulNBits layout: codes
0..15 in blocks along the input dimension, two per byte with the first in the low nibble, one fp32
scale and one 4-bit zero point per block, `w = (q - zero) * scale`. So when a layer's block (group)
is a power of two of at least 16 (what MatMulNBits takes), its packed codes, scales and zero points
become the node's inputs without rounding anything again, and the graph computes compress's model.

The float graph (torch.onnx) holds each linear layer as `MatMul(x, W^T)` with `W^T` a constant; the
layer is found by the exact bytes of its dequantized `W^T` (the exporter renames the weights to
anonymous constants, so names cannot be matched).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MIN_BLOCK = 16


def int4_layers(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """compress's quantized linear layers of `model`: the int4 ones MatMulNBits holds as they are,
    and for every other one why not ("name: reason")."""
    from compress.quant.dynamic import DynamicInt8Linear
    from compress.quant.weight_only import WeightOnlyLinear

    mappable: dict[str, Any] = {}
    others: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, DynamicInt8Linear):
            others.append(f"{name}: int8-dynamic (activations are quantized too; MatMulNBits is weight-only)")
        elif isinstance(module, WeightOnlyLinear):
            block = module.group
            if module.bits != 4:
                others.append(f"{name}: int{module.bits} weight-only (written as int4 MatMulNBits only)")
            elif block < MIN_BLOCK or block & (block - 1):
                others.append(f"{name}: group {block} (MatMulNBits needs a power of two of at least {MIN_BLOCK})")
            else:
                mappable[name] = module
    return mappable, others


def _key(array: np.ndarray) -> str:
    return f"{array.shape}:{hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()}"


def pack_zero_points(zeros: torch.Tensor) -> np.ndarray:
    """(N, blocks) uint8 zero points -> (N * ceil(blocks / 2)) bytes, two per byte, low nibble first."""
    z = zeros.to(torch.uint8).numpy()
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)


def write_nbits(src: Path, dst: Path, layers: dict[str, Any]) -> list[str]:
    """Replace the MatMul of each of `layers` in the float graph `src` by a MatMulNBits node holding the
    layer's own codes; save to `dst`. Returns the names of the layers not found in the graph."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    by_weight = {_key(layer.rows().detach().t().numpy()): name for name, layer in layers.items()}
    initializers = {init.name: init for init in graph.initializer}
    found: set[str] = set()
    nodes = []
    for node in graph.node:
        init = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        name = by_weight.get(_key(numpy_helper.to_array(init))) if init is not None else None
        if name is None or name in found:
            nodes.append(node)
            continue
        found.add(name)
        layer = layers[name]
        n, k, block = layer.out_features, layer.in_features, layer.group
        prefix = f"{name}.nbits"
        graph.initializer.extend([
            numpy_helper.from_array(layer.qweight.detach().numpy().reshape(n, k // block, block // 2), f"{prefix}.B"),
            numpy_helper.from_array(layer.scales.detach().float().numpy().reshape(-1), f"{prefix}.scales"),
            numpy_helper.from_array(pack_zero_points(layer.zeros), f"{prefix}.zero_points"),
        ])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{prefix}.B", f"{prefix}.scales",
                                                      f"{prefix}.zero_points"], list(node.output),
                                      name=prefix, domain="com.microsoft", K=k, N=n, bits=4, block_size=block))
    del graph.node[:]
    graph.node.extend(nodes)
    # The float weights the new nodes replaced are no longer read: drop them (the file's size is the point).
    used = {i for node in graph.node for i in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return sorted(set(layers) - found)
