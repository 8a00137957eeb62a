"""The quantize stage's config family: the fields every scheme shares, and the registry of schemes.

Each scheme (compress/quant/schemes/) is a subclass of `Quantize` that narrows `scheme` to its own
name, adds only its own fields, and registers a handler with `QUANTIZE_SCHEMES.register(...)`. The
recipe validates a quantize stage as a union over the schemes, so a recipe stays flat YAML
(`type: quantize, scheme: awq, group_size: 128`) and a field of another scheme is refused by name.
A leaf module (it imports no scheme), so schemes and the stage import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from compress.methods import FamilyConfig, MethodFamily
from compress.quant.select import bad_patterns

CPU_ALTERNATIVE = "int8-dynamic (CPU speed) or int4-weight / gptq / awq (4-bit size)"


class Quantize(FamilyConfig):
    """Quantize linear layers (and optionally embeddings) to 8, 4, 3 or 2 bits; sizes reported per layer."""

    type: Literal["quantize"] = "quantize"
    scheme: str = Field("int8-dynamic", description=(
        "int8 (bitsandbytes LLM.int8), nf4/fp4 (bitsandbytes 4-bit), int8-dynamic (int8 weights and "
        "run-time int8 activations: the CPU speed path), int8-weight/int4-weight (weight-only, "
        "round-to-nearest), gptq and awq (calibrated weight-only, 4/3/2 bits), mixed (per-layer 8/4/3 bits "
        "by measured sensitivity under an average-bits budget)."))
    include: list[str] | None = Field(None, description=(
        "Only layers whose name matches one of these regexes (matched against trailing dotted parts, "
        "e.g. 'query', 'layer\\.0\\..*'); default: all."))
    exclude: list[str] = Field(default_factory=list,
                               description="Skip layers whose name matches one of these regexes.")
    module_types: list[str] = Field(["Linear"], min_length=1, description=(
        "Layer classes to quantize (class or base-class names); only linear layers can be quantized "
        "(GPT-2's Conv1D, a linear with a transposed weight, counts as Linear)."))
    quantize_head: bool = Field(False, description=(
        "Also quantize the output head (lm_head, classifier); off because it is the most sensitive layer."))
    embeddings: Literal["none", "int8", "int4"] = Field("none", description=(
        "Quantize embedding tables too (about half of a small model such as MiniLM). A table tied to "
        "the output head is quantized once and the head reads it; embeddings with a forward of their "
        "own (OPT's learned positions) stay float."))
    embedding_group_size: int | None = Field(None, ge=0, description=(
        "Values per scale along the embedding dimension; 0 = one per row. Default: 0 for int8, 64 for int4."))
    calibration_samples: int | None = Field(None, gt=0, description=(
        "gptq / awq / smoothing: calibration blocks of data.max_length tokens, drawn with calibration_seed "
        "(one example per block for classification); default: data.calibration_samples."))
    calibration_seed: int | None = Field(None, description=(
        "Seed for drawing calibration examples; default: the stage seed."))
    on_unsupported: Literal["error", "skip"] = Field("error", description=(
        "A layer the scheme cannot handle here: stop with an error naming it, or skip it (kept in float, "
        "listed in the report)."))

    # bitsandbytes schemes produce transformers checkpoints and cannot hold quantized embeddings.
    bitsandbytes: ClassVar[bool] = False

    @classmethod
    def problems_beside_foreign_fields(cls, data: dict[str, Any]) -> list[str]:
        scheme = data.get("scheme", QUANTIZE_SCHEMES.default)
        return cls._embedding_problems(data.get("embeddings", "none"), "embedding_group_size" in data, scheme)

    @classmethod
    def _embedding_problems(cls, embeddings: str, group_set: bool, scheme: str) -> list[str]:
        problems = []
        if embeddings != "none" and cls.bitsandbytes:
            problems.append(f"embeddings: scheme {scheme} keeps embeddings in float (transformers' "
                            f"bitsandbytes format cannot hold them); use scheme int8-weight, int4-weight, "
                            f"gptq or awq with embeddings, or set embeddings: none")
        if group_set and embeddings == "none":
            problems.append("embedding_group_size needs embeddings: int8 or int4; remove it or set embeddings")
        return problems

    @model_validator(mode="after")
    def _consistent(self) -> Quantize:
        problems = self._embedding_problems(self.embeddings, "embedding_group_size" in self.model_fields_set,
                                            self.scheme)
        for name in ("include", "exclude"):
            bad = bad_patterns(getattr(self, name))
            if bad:
                problems.append(f"{name}: not a valid regular expression: {', '.join(bad)}")
        problems += self.scheme_field_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ------------------------------------------------------------------ what a scheme overrides

    def scheme_field_problems(self) -> list[str]:
        """Cross-field mistakes of this scheme's own fields, each naming the field and the fix."""
        return []

    def uses_calibration(self) -> bool:
        """Whether the scheme runs the model on calibration data."""
        return False

    def layer_problem(self, module: nn.Module, device: str) -> str | None:
        """Why this scheme cannot quantize this layer here, or None."""
        return None

    def scheme_problems(self, bundle: Any, ctx: Any) -> list[str]:
        """Problems found before the run (device, kernels), each naming the field and the fix."""
        return []

    def error_bound(self) -> float:
        """The largest relative weight error ||W_q - W|| / ||W|| a correctly quantized layer shows."""
        from compress.quant.verify import WEIGHT_ERROR_BOUND

        return WEIGHT_ERROR_BOUND[self.scheme]

    def resolved_embedding_group(self) -> int:
        if self.embedding_group_size is not None:
            return self.embedding_group_size
        return 0 if self.embeddings == "int8" else 64


QUANTIZE_SCHEMES = MethodFamily(Quantize, "scheme", default="int8-dynamic")


@dataclass
class SchemeOutput:
    """What a scheme handler returns: the model (the same object, or a new one for bitsandbytes), each
    target's relative weight error, facts for the report, the bundle format, and the targets the scheme
    chose to keep in float (mixed precision), which the stage then does not expect quantized."""

    model: nn.Module
    errors: dict[str, float]
    facts: dict[str, Any] = field(default_factory=dict)
    format: str = "quantized"
    kept_float: list[str] = field(default_factory=list)
