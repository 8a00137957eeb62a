"""Built-in stages. Each module registers itself explicitly when imported here."""

from compress.stages import finetune  # noqa: F401

from compress.stages.finetune import Finetune
from compress.stages.prune import Prune
from compress.stages.lowrank import LowRank

