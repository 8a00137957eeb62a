"""The quantize stage's schemes, one module each: its config (a `Quantize` subclass with its own
fields) and its handler, registered in `compress.quant.config.QUANTIZE_SCHEMES`.

- `bnb`: int8 / nf4 / fp4 through bitsandbytes (transformers checkpoints)
- `dynamic`: int8-dynamic (fbgemm int8 activations, optional SmoothQuant)
- `rtn`: int8-weight / int4-weight round-to-nearest (and the weight-only fields: group size, bits)
- `gptq`: GPTQ with activation order, static groups and an MSE-fitted grid
- `awq`: activation-aware scaling folded into the previous op, with clipping search
- `mixed`: per-layer widths by measured sensitivity under an average-bits budget
"""

# Registration order is the order `compress stages` and error messages list the schemes in.
from compress.quant.schemes import bnb, dynamic, rtn, gptq, awq, mixed  # noqa: F401, I001
