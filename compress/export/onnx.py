"""ONNX export for ONNX Runtime: the graph, ORT's graph optimisations, int8 dynamic quantization.

Path: `torch.onnx.export` of a float copy of the model -> ONNX Runtime's transformer optimizer
(attention / embedding / layer-norm / GELU fusions; it is ORT's own tool, so the fused ops are ones
ORT runs) ->
`onnxruntime.quantization.quantize_dynamic` (int8 weights, activations quantized at run time,
the ORT counterpart of compress's int8-dynamic). The result is evaluated in ONNX Runtime on the
held-out rows and must match the PyTorch model within the tolerances below, else `StageError`.

compress's own quantized layers run torch's fbgemm ops, which torch.onnx cannot trace; their math
is `x @ (codes * scales)^T`, so the graph is exported from exactly those dequantized weights and
ORT re-quantizes them (the reason is recorded in the facts).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import StageError
from compress.export.measure import accuracy, parity, side_by_side

# Float graph vs PyTorch: the same fp32 math on other kernels (fused layer norm, other summation
# order); MiniLM measured 6e-7 of the largest logit. 1e-4 leaves room for that and nothing more.
FLOAT_TOLERANCE = 1e-4
# int8 graph vs the PyTorch model it came from: held-out accuracy may drop at most this many points
# and the top-1 predictions must agree on at least this share of rows (MiniLM: -0.5 pt, 97%+).
INT8_MAX_ACCURACY_DROP = 1.0
INT8_MIN_AGREEMENT = 0.95
GRAPH = "model.onnx"


@dataclass
class OnnxOptions:
    """What to write and how strictly to check it (defaults: the constants above)."""

    quantize: str = "int8"  # "int8" (dynamic, weights int8) or "none" (the fp32 graph)
    per_channel: bool = True
    optimize: bool = True
    max_rel_logit_diff: float = FLOAT_TOLERANCE
    max_accuracy_drop: float = INT8_MAX_ACCURACY_DROP
    min_agreement: float = INT8_MIN_AGREEMENT
    seq_len: int = 64
    repeats: int = 10


def float_copy(model: nn.Module) -> tuple[nn.Module, str | None]:
    """A copy of `model` that torch.onnx can trace, and why it differs from `model` (None: same).

    compress's int8-dynamic and weight-only layers become `nn.Linear` holding their dequantized
    weight (the exact matrix they multiply by), quantized embeddings become `nn.Embedding`."""
    from compress.quant.dynamic import DynamicInt8Linear
    from compress.quant.embedding import QuantEmbedding, TiedQuantHead
    from compress.quant.format import set_module
    from compress.quant.weight_only import WeightOnlyLinear

    kinds = (DynamicInt8Linear, WeightOnlyLinear, QuantEmbedding, TiedQuantHead)
    names = {name: type(mod).__name__ for name, mod in model.named_modules() if isinstance(mod, kinds)}
    if not names:
        return model, None
    model = copy.deepcopy(model)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, TiedQuantHead):
            raise StageError(f"onnx export: {name} is a quantized tied head, which the ONNX exporter does not "
                             f"map; export the float model (before the quantize stage)")
        with torch.no_grad():
            if isinstance(layer, QuantEmbedding) and layer.scale is not None:
                raise StageError(f"onnx export: {name} is a scaled quantized embedding, which the exporter does "
                                 f"not map; export the float model (before the quantize stage)")
            if isinstance(layer, QuantEmbedding):
                plain: nn.Module = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
                plain.weight.copy_(layer.rows())
            else:
                plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                plain.weight.copy_(layer.weight.float())
                if layer.bias is not None:
                    plain.bias.copy_(layer.bias.float())
        set_module(model, name, plain)
    kinds_used = sorted(set(names.values()))
    reason = (f"compress's {', '.join(kinds_used)} layers ({len(names)}) run torch quantized ops that "
              f"torch.onnx cannot export; the graph holds their dequantized weights (codes x scales, the "
              f"matrices they multiply by)")
    return model.eval(), reason


class _Logits(nn.Module):
    """The model as a function of positional tensors -> logits (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module, names: list[str], fixed: dict[str, Any]):
        super().__init__()
        self.model, self.names, self.fixed = model, names, fixed

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors, strict=True)), **self.fixed).logits


FUSABLE_EXPORTER = "torch.onnx TorchScript exporter, eager attention"


def export_graph(model: nn.Module, sample: dict[str, torch.Tensor], path: Path, fusable: bool = False,
                 **fixed: Any) -> str:
    """fp32 ONNX graph with dynamic batch and sequence axes; `fixed` are keyword arguments baked into the
    call (e.g. `use_cache=False`). Returns which exporter wrote it.

    `fusable`: ONNX Runtime's transformer optimizer fuses attention (and the embeddings) only on the
    graph shape that torch's TorchScript exporter writes for eager attention; on the dynamo exporter's
    graph it finds no Attention (MiniLM student: 3 Attention + EmbedLayerNormalization fused vs none),
    and the unfused int8 graph is slower at batch 32 than compress's own int8 model. So a graph meant
    for those fusions is tried that way first, and the dynamo exporter is the fallback."""
    if fusable:
        try:
            _export_torchscript(model, sample, path, fixed)
            return FUSABLE_EXPORTER
        except Exception as exc:  # noqa: BLE001  (any tracing failure: the dynamo exporter may still work)
            import logging

            logging.getLogger("compress").warning("onnx export: the TorchScript exporter failed (%s: %s); using the "
                                                  "dynamo exporter, without attention fusion", type(exc).__name__,
                                                  (str(exc).strip().splitlines() or [""])[0][:200])
    _export_dynamo(model, sample, path, fixed)
    return "torch.onnx dynamo exporter"


def _export_torchscript(model: nn.Module, sample: dict[str, torch.Tensor], path: Path, fixed: dict[str, Any]) -> None:
    import warnings

    names = list(sample)
    before = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")  # the matmul-softmax-matmul pattern ORT's fusion matches
    try:
        with warnings.catch_warnings():  # torch marks this exporter deprecated; it is the one ORT's fusions fit
            warnings.simplefilter("ignore")
            # The wrapper in eval mode too: this exporter restores the mode the module it is given had, and a
            # new module is in training mode, which would leave the model's dropout on after the export.
            torch.onnx.export(_Logits(model, names, fixed).eval(), tuple(sample[n] for n in names), str(path),
                              dynamo=False, input_names=names, output_names=["logits"], opset_version=17,
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                            "logits": {0: "batch"}})
    finally:
        if before is not None:
            model.set_attn_implementation(before)


def _export_dynamo(model: nn.Module, sample: dict[str, torch.Tensor], path: Path, fixed: dict[str, Any]) -> None:
    from torch.export import Dim

    names = list(sample)
    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=2, max=4096)
    args = tuple(sample[n] for n in names)
    program = torch.onnx.export(_Logits(model.eval(), names, fixed), args, dynamo=True, input_names=names,
                                output_names=["logits"], dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),),
                                optimize=True, verbose=False)
    program.save(str(path))


def optimize_graph(src: Path, dst: Path, config: Any) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (fusions it runs natively); returns the fused op counts."""
    from onnxruntime.transformers import optimizer

    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    optimized = optimizer.optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                                         opt_level=1)
    optimized.save_model_to_file(str(dst))
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_graph(src: Path, dst: Path, per_channel: bool) -> None:
    """ONNX Runtime's dynamic int8 quantization (int8 weights; activations quantized per call)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ORT's fused ops (Attention, EmbedLayerNormalization) are outside ONNX's shape inference, so the
    # quantizer is told their outputs' type (float) instead of stopping at them.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with all of ORT's online graph optimisations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # ORT's worker threads spin-wait after each call by default, which would steal the cores from
    # whatever runs next (PyTorch, in the side-by-side timing): measured 600 ms vs 1 ms for a tiny BERT.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(sess: Any, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    names = [i.name for i in sess.get_inputs()]
    return torch.cat([torch.from_numpy(sess.run(None, {n: b[n].numpy() for n in names})[0]) for b in batches])


@torch.inference_mode()
def torch_logits(model: nn.Module, batches: list[dict[str, torch.Tensor]], names: list[str]) -> torch.Tensor:
    return torch.cat([model(**{n: b[n] for n in names}).logits.float() for b in batches])


def timing_inputs(sample: dict[str, torch.Tensor], batch: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), generator=gen)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return {n: full[n] for n in sample}


def export_onnx(model: nn.Module, tokenizer: Any, folder: Path, batches: list[dict[str, torch.Tensor]],
                options: OnnxOptions, logger: Any) -> dict[str, Any]:
    """Write `folder/model.onnx` (+ tokenizer), check it in ONNX Runtime, return the facts.

    `batches` are held-out batches with labels; the PyTorch side is `model` itself."""
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batches[0]]
    inputs = [{n: b[n] for n in names} for b in batches]
    labels = torch.cat([b["labels"] for b in batches])
    exportable, reason = float_copy(model)
    work = folder / ".graphs"
    work.mkdir(parents=True, exist_ok=True)
    float_path, final = work / "float.onnx", folder / GRAPH
    exporter = export_graph(exportable, inputs[0], float_path, fusable=options.optimize)

    reference = torch_logits(model, inputs, names)
    float_ref = reference if exportable is model else torch_logits(exportable, inputs, names)
    graph_parity = parity(float_ref, ort_logits(session(float_path), inputs))
    if exporter == FUSABLE_EXPORTER and not graph_parity["max_rel_logit_diff"] <= options.max_rel_logit_diff:
        # A trace can bake in something of its sample for an architecture this path was not tried on;
        # the dynamo exporter's graph is the one checked on every architecture, so it gets its turn.
        logger.warning("onnx export: the TorchScript graph's logits are %.3g of the largest logit off PyTorch's; "
                       "exporting with the dynamo exporter instead (no attention fusion)",
                       graph_parity["max_rel_logit_diff"])
        exporter = export_graph(exportable, inputs[0], float_path)
        graph_parity = parity(float_ref, ort_logits(session(float_path), inputs))
    if not graph_parity["max_rel_logit_diff"] <= options.max_rel_logit_diff:
        raise StageError(f"onnx export: the fp32 graph's logits differ from PyTorch's by "
                         f"{graph_parity['max_abs_logit_diff']:.4g} ({graph_parity['max_rel_logit_diff']:.3g} of the "
                         f"largest logit; allowed {options.max_rel_logit_diff:g}) on {len(labels)} held-out rows: "
                         f"the exported graph does not compute the model")
    fused: dict[str, int] = {}
    source = float_path
    if options.optimize:
        source = work / "optimized.onnx"
        fused = optimize_graph(float_path, source, model.config)
    if options.quantize == "int8":
        quantize_graph(source, final, options.per_channel)
    else:
        os.replace(source, final)
    sess = session(final)
    logits = ort_logits(sess, inputs)
    check = parity(reference, logits)
    acc_torch, acc_ort = accuracy(reference, labels), accuracy(logits, labels)
    drop = 100 * (acc_torch - acc_ort)
    # An fp32 graph must compute its float source exactly (when that is a dequantized copy of
    # compress's int8 model, the activation rounding is the difference, reported in `check`).
    if options.quantize == "none" and not (
            float_check := parity(float_ref, logits))["max_rel_logit_diff"] <= options.max_rel_logit_diff:
        check = float_check
        raise StageError(f"onnx export: the optimised fp32 graph's logits differ from PyTorch's by "
                         f"{check['max_rel_logit_diff']:.3g} of the largest logit (allowed "
                         f"{options.max_rel_logit_diff:g}); ORT's optimizer changed the model")
    if options.quantize == "int8" and (drop > options.max_accuracy_drop
                                       or check["top1_agreement"] < options.min_agreement):
        raise StageError(f"onnx export: the int8 graph in ONNX Runtime scores {100 * acc_ort:.2f}% on {len(labels)} "
                         f"held-out rows against PyTorch's {100 * acc_torch:.2f}% (drop {drop:.2f} pt, allowed "
                         f"{options.max_accuracy_drop:g}) and agrees on {100 * check['top1_agreement']:.1f}% of "
                         f"top-1 predictions (needed {100 * options.min_agreement:g}%); set "
                         f"quantize: none, or per_channel: true, or loosen max_accuracy_drop")

    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    latency: dict[str, dict[str, float]] = {}
    for batch in (1, 32):
        feed = timing_inputs(inputs[0], batch, options.seq_len, vocab)
        arrays = {n: t.numpy() for n, t in feed.items()}
        timed = side_by_side({"pytorch": lambda f=feed: model(**f),
                              "onnxruntime": lambda a=arrays: sess.run(None, a)},
                             repeats=options.repeats if batch == 1 else max(3, options.repeats // 3))
        latency[f"b{batch}"] = timed
    finish_folder(folder, work, tokenizer)
    facts = {
        "format": "onnx",
        "file": GRAPH,
        "quantize": options.quantize,
        "per_channel": options.per_channel if options.quantize == "int8" else None,
        "exporter": exporter,
        "fused_ops": ", ".join(f"{k} {v}" for k, v in fused.items()) or "none",
        "source": (reason + ("; ONNX Runtime's int8 quantization rounds them again" if options.quantize == "int8"
                             else "")) if reason else "the PyTorch model as it is (float)",
        "file_bytes": final.stat().st_size,
        "eval_rows": len(labels),
        "accuracy_pytorch": round(acc_torch, 5),
        "accuracy_runtime": round(acc_ort, 5),
        "accuracy_drop_pt": round(drop, 3),
        "fp32_graph_max_rel_logit_diff": graph_parity["max_rel_logit_diff"],
        **{k: round(v, 6) for k, v in check.items()},
        **{f"latency_{b}_ms_{side}": ms for b, sides in latency.items() for side, ms in sides.items()},
        "seq_len": options.seq_len,
        "threads": torch.get_num_threads(),
        "tolerances": {"max_rel_logit_diff": options.max_rel_logit_diff,
                       "max_accuracy_drop_pt": options.max_accuracy_drop, "min_agreement": options.min_agreement},
    }
    logger.info("onnx export: %s, %.1f MiB, accuracy %.2f%% (PyTorch %.2f%%), b1 %.1f vs %.1f ms, b32 %.1f vs %.1f ms",
                final.name, final.stat().st_size / 2**20, 100 * acc_ort, 100 * acc_torch,
                latency["b1"]["onnxruntime"], latency["b1"]["pytorch"], latency["b32"]["onnxruntime"],
                latency["b32"]["pytorch"])
    return facts


HOW_TO_LOAD = """\
import onnxruntime as ort
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}")
session = ort.InferenceSession("{folder}/model.onnx", providers=["CPUExecutionProvider"])
batch = tokenizer(["an example"], return_tensors="np")
names = [i.name for i in session.get_inputs()]
logits = session.run(None, {{n: batch[n] for n in names}})[0]
"""


def finish_folder(folder: Path, work: Path, tokenizer: Any) -> None:
    """The export folder gets the tokenizer; the scratch folder (intermediate graphs) goes."""
    tokenizer.save_pretrained(folder)
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()
