"""The one timing implementation, shared by eval points, the side-by-side pass and `bench/`.

Models are timed in interleaved rounds (A B C A B C ...): machine noise from other processes then
falls on every model alike, so ratios taken round by round stay meaningful on a shared machine.
Timing a single model is the one-model case of the same loop.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from compress.errors import CompressError

Call = Callable[[], Any]


@contextmanager
def torch_threads(n: int | None):
    """Run with `n` torch threads (torch's default when None); yields the count in use."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _cpu_ticks() -> tuple[int, int] | None:
    """(ticks busy at normal priority, all ticks) over all CPUs so far, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, _nice, system, _idle, _iowait, irq, softirq, steal = fields
    # Time at nice > 0 is left out: such work yields the CPU to a timing pass at normal priority.
    return user + system + irq + softirq + steal, sum(fields)


def busy_cores(window: float = 1.0) -> float | None:
    """How many of the machine's cores other work kept busy at normal priority over `window` seconds
    (this process sleeps meanwhile), or None where /proc/stat cannot be read."""
    before = _cpu_ticks()
    time.sleep(window)
    after = _cpu_ticks()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def threads_for_free_cores(busy: float | None) -> tuple[int | None, str | None]:
    """The thread count for a timing pass given `busy` cores (None: torch's default), and why.

    Why: torch's parallel ops end each step at a barrier, so with more threads than free cores every
    step waits for the thread that lost its core. Under one busy-looping process on 2 cores the
    quickstart's batch-1 speed-ups moved by up to 20% between runs at 2 threads, and agreed within 5%
    at 1 thread (which also ran faster there). The figures are then at fewer threads; the note says so."""
    default = torch.get_num_threads()
    if busy is None or default <= 1:
        return None, None
    free = max(1, min(default, len(os.sched_getaffinity(0)) - round(busy)))
    if free >= default:
        return None, None
    return free, (f"Timed at {free} thread(s), not {default}: {busy:.1f} of the cores were busy with other work "
                  f"at normal priority just before the pass, and more threads than free cores time the waits "
                  f"for a descheduled thread rather than the model (set eval.threads to fix the count).")


def random_ids(vocab: int, batch: int, seq_len: int, seed: int = 0, low: int = 1000) -> torch.Tensor:
    """Token ids drawn reproducibly from [min(low, vocab // 2), vocab): real tokens, not special ones."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low=min(low, vocab // 2), high=vocab, size=(batch, seq_len), generator=gen)


def model_vocab(model: Any, tokenizer: Any = None) -> int:
    """The vocabulary size a model's embedding accepts."""
    return int(getattr(model.config, "vocab_size", None) or len(tokenizer))


def forward_call(model: Any, ids: torch.Tensor) -> Call:
    """One forward pass over `ids` (all positions attended), without autograd."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def call() -> Any:
        with torch.inference_mode():
            return model(**inputs)

    return call


class _StepClock:
    """A logits processor that only notes the time: transformers calls it once per generation step,
    right after that step's forward pass, so its first call marks the end of prefill."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def generate_call(model: Any, ids: torch.Tensor, new_tokens: int, pad_token_id: int | None,
                  clock: _StepClock | None = None) -> Call:
    """Greedy generation of exactly `new_tokens` tokens after the prompt `ids`, with the KV cache.

    transformers' `generate` handles every architecture's cache; min_new_tokens keeps an early EOS
    from cutting a timed run short. A `clock` records when each step's forward pass ended."""
    from transformers import LogitsProcessorList

    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "do_sample": False, "num_beams": 1,
              "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "use_cache": True,
              "pad_token_id": pad_token_id}
    if clock is not None:
        kwargs["logits_processor"] = LogitsProcessorList([clock])

    def call() -> Any:
        with torch.inference_mode():
            return model.generate(**kwargs)

    return call


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(call: Call, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - start


class MeasurementStopped(CompressError):
    """The user asked to stop (Ctrl-C, SIGTERM) while models were being timed or measured."""


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise MeasurementStopped("stopped on request while timing")


ROUND_KEEPS = {"median": statistics.median, "min": min}


def time_interleaved(calls: Sequence[Call], *, warmup: int, rounds: int, repeats: int = 1,
                     device: str = "cpu", stop: threading.Event | None = None,
                     keep: str = "median") -> list[list[float]]:
    """Seconds per call for each callable: `rounds` values each, one per round.

    Every round runs each callable `repeats` times in turn (A B C A B C ...) and keeps the median (or,
    with keep="min", the fastest) of its repeats. Warm-up calls (untimed) are interleaved the same way
    first. A set `stop` ends the timing at the next round with MeasurementStopped.

    Why "min" for ratios: another process on the CPU only ever adds time. A millisecond-long forward
    that loses its core for one scheduler slice can take several times as long, and with 2 of 2 cores
    contended that hits most calls, so a median can still be a stalled call; the fastest call of a
    round is the one the contention touched least (timeit's advice for the same reason)."""
    reduce = ROUND_KEEPS[keep]
    check_stop(stop)
    for _ in range(warmup):
        for call in calls:
            call()
    out: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        check_stop(stop)
        for j, call in enumerate(calls):
            out[j].append(reduce([_timed(call, device) for _ in range(repeats)]))
    return out


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def round_ratios(base: Sequence[float], other: Sequence[float], higher_is_better: bool = False) -> list[float]:
    """Speed-up of `other` over `base` in each round: base/other for times, other/base for rates."""
    return [(o / b) if higher_is_better else (b / o) for b, o in zip(base, other, strict=True)]


def significant(ratios: Sequence[float]) -> bool:
    """A ratio is significant when its whole spread lies on one side of 1.0."""
    return min(ratios) > 1.0 or max(ratios) < 1.0


def time_generation(models: Sequence[Any], ids: torch.Tensor, new_tokens: int, pad_ids: Sequence[int | None], *,
                    warmup: int, rounds: int, device: str = "cpu",
                    stop: threading.Event | None = None) -> list[dict[str, list[float]]]:
    """Time to first token (s) and decode tokens/s for each model, per round, interleaved.

    Each round runs one greedy generation of 1 + new_tokens tokens per model in turn. Within that one
    call, the time to first token is the start to the end of prefill (the first step), and decode
    speed is batch * new_tokens over the time of the remaining new_tokens steps (KV cache in use)."""
    clocks = [_StepClock(device) for _ in models]
    calls = [generate_call(m, ids, 1 + new_tokens, pad, clock)
             for m, pad, clock in zip(models, pad_ids, clocks, strict=True)]
    for _ in range(warmup):
        for call in calls:
            call()
    out: list[dict[str, list[float]]] = [{"ttft_s": [], "decode_tps": []} for _ in models]
    for _ in range(rounds):
        check_stop(stop)
        for k, call in enumerate(calls):
            clocks[k].times.clear()
            _sync(device)
            start = time.perf_counter()
            call()
            steps = clocks[k].times
            if len(steps) != 1 + new_tokens:  # a transformers change would make the figures wrong: say so
                raise RuntimeError(f"generation timing expected {1 + new_tokens} steps, saw {len(steps)}")
            out[k]["ttft_s"].append(steps[0] - start)
            out[k]["decode_tps"].append(ids.shape[0] * new_tokens / (steps[-1] - steps[0]))
    return out
