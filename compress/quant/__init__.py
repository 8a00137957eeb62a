"""Quantization schemes behind the `quantize` stage, one module per job.

- `bnb`: bitsandbytes int8 / nf4 / fp4 through transformers (standard checkpoints)
- `dynamic`: int8 weights x run-time int8 activations on fbgemm (CPU speed), optional SmoothQuant
- `weight_only`: int8 / int4 weights with per-group scales (round to nearest)
- `gptq`: calibrated 4-bit weights (GPTQ), same layout as `weight_only`; its inputs are measured by
  compress.calibration and its Hessian core is compress.hessian (shared with SparseGPT)
- `embedding`: int8 / int4 embedding tables
- `accounting`: stored bytes, bits per weight and the format's limit, per layer
- `format`: the `quantized` save/load format for the layers above
"""
