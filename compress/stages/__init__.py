"""Built-in stages. Each module registers itself explicitly when imported here."""

from compress.stages import finetune  # noqa: F401

from compress.stages.finetune import Finetune

__all__ = ["Finetune"]
