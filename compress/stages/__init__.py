"""Built-in stages. Each module registers itself when imported here (explicitly: no discovery)."""

from compress.stages import finetune_methods  # noqa: F401  (registers the finetune methods)
from compress.stages.compose import Compose
from compress.stages.distill import Distill
from compress.stages.export import Export
from compress.stages.finetune import Finetune
from compress.stages.lowrank import LowRank
from compress.stages.prune import Prune
from compress.stages.quantize import Quantize
from compress.stages.vocab import TrimVocab

__all__ = ["Compose", "Distill", "Export", "Finetune", "LowRank", "Prune", "Quantize", "TrimVocab"]
