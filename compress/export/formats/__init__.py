"""The export stage's formats, one module each: its config (an `Export` subclass with its own fields)
and its handler, registered in `compress.export.config.EXPORT_FORMATS`.

- `onnx`: ONNX Runtime (classifiers: int8 dynamic; causal LMs: int4 weight-only MatMulNBits)
- `compressed`: compressed-tensors for transformers / vLLM (W8A8, W4A16, sparse bitmask)
- `gguf`: llama.cpp (its converter and quantizer; perplexity and speed in llama.cpp)
"""

# Registration order is the order `compress stages` and error messages list the formats in.
from compress.export.formats import onnx, compressed, gguf  # noqa: F401, I001
