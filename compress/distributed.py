"""Which process this is under `torchrun` / `accelerate launch`, and how the processes agree.

The runner is the only user: every rank loads and trains; rank 0 alone writes the run folder. At
each boundary the ranks exchange their outcome, so all of them end with the same success or the
same error (a rank that raised while the others waited would otherwise hang them until a timeout).
One process (no launcher) is world size 1, where every call here returns at once.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from compress.errors import CompressError, RecipeError

T = TypeVar("T")

# Rank 0 evaluates and saves while the others wait at a barrier; the default 30-minute collective
# timeout would kill a run whose evaluation of a large model takes longer.
WAIT_LIMIT = timedelta(hours=12)


class OtherRankFailed(CompressError):
    """Another process of this launch failed; this one stops with the same message."""

    exit_code = 1


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's value on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 only; every rank returns its result or raises its error."""
        if not self.distributed:
            return work()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", work())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
                outcome = ("error", exc)
        outcome = self.broadcast(_picklable(outcome))
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank when any rank failed: its own error where it failed, else the first
        failing rank's error, named."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages: list[Any] = [None] * self.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        torch.distributed.all_gather_object(messages, mine)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            rank, message = failed[0]
            raise OtherRankFailed(f"process {rank} of {self.world_size} failed: {message}")


def current_ranks() -> Ranks:
    """This process's place in the launch, from the launcher's environment; starts the process group
    (gloo on CPU, NCCL on GPUs) the first time it is needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)  # "cuda" then means this rank's own GPU, not GPU 0
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=WAIT_LIMIT)
    return Ranks(rank=rank, world_size=world, local_rank=local)


def _picklable(outcome: tuple[str, Any]) -> tuple[str, Any]:
    """Errors cross processes by pickle (torch's broadcast_object_list, between this launch's own
    ranks; nothing read from disk or the network); one that does not pickle travels as its message.
    The loads below only round-trips bytes this process just made, to find exceptions whose
    constructor cannot rebuild them."""
    try:
        pickle.loads(pickle.dumps(outcome))  # some exceptions pickle but cannot be rebuilt
        return outcome
    except Exception:  # noqa: BLE001 - any pickling failure
        kind, value = outcome
        if kind == "error":
            return kind, CompressError(f"{type(value).__name__}: {value}")
        raise


def resolve_device(asked: str, ranks: Ranks | None = None) -> str:
    """`cuda` or `cpu` for the recipe's `device` (auto, cpu or cuda). Under a distributed launch, `cuda` is
    this rank's own GPU (LOCAL_RANK), which `current_ranks` made the current device."""
    if asked == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: 'cuda' was asked for but no CUDA GPU is visible; use device: auto or cpu")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if asked == "auto" else asked
    if ranks is not None and ranks.distributed and device == "cuda" and ranks.local_rank >= torch.cuda.device_count():
        raise RecipeError(f"device: process {ranks.rank} has LOCAL_RANK {ranks.local_rank} but only "
                          f"{torch.cuda.device_count()} GPUs are visible; launch at most that many per node")
    return device
