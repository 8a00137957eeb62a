"""Quantization schemes behind the `quantize` stage, one module per job.

- `bnb`: bitsandbytes int8 / nf4 / fp4 through transformers (standard checkpoints)
- `dynamic`: int8 weights x run-time int8 activations on fbgemm (CPU speed), optional SmoothQuant
- `weight_only`: int8 / int4 / int3 / int2 weights with per-group scales (round to nearest)
- `grid`: a group's grid: min-max, symmetric, or the range shrink minimising an error
- `gptq`: calibrated 4/3/2-bit weights (GPTQ; act-order, static groups, MSE grid), same layout as
  `weight_only`; its inputs are measured by compress.calibration and its Hessian core is
  compress.hessian (shared with SparseGPT)
- `awq`: activation-aware scales folded into the previous op, and clipping search (AWQ)
- `config` + `schemes/`: the quantize stage's config family, one module per scheme (config + handler)
- `embedding`: int8 / int4 embedding tables
- `accounting`: stored bytes, bits per weight and the format's limit, per layer
- `format`: the `quantized` save/load format for the layers above
"""
