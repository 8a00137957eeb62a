"""Speed of one model at one eval point, timed alone: median latency at batch 1 and batch N.

These figures are taken during the run, minutes apart from the other points' (labelled "timed
alone" in reports); ratios between models come from the side-by-side pass (side_by_side.py).
On CPU the peak memory here is the increase of the process's resident set size during the batch-N
runs, which says little; isolated per-model memory is measured by memory.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import torch

from compress.evaluate.timing import forward_call, model_vocab, random_ids, time_interleaved, torch_threads
from compress.report.schema import SpeedMetrics


class _RssSampler:
    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_speed(
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    warmup: int = 2,
    repeats: int = 5,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> SpeedMetrics:
    """Median latency of one model timed alone (the one-model case of `time_interleaved`)."""
    model.eval()
    vocab = model_vocab(model, tokenizer)
    with torch_threads(threads) as used_threads:
        one = forward_call(model, random_ids(vocab, 1, seq_len, seed).to(device))
        lat1 = time_interleaved([one], warmup=warmup, rounds=1, repeats=repeats, device=device)[0][0]
        many = forward_call(model, random_ids(vocab, batch_size, seq_len, seed).to(device))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            latn = time_interleaved([many], warmup=warmup, rounds=1, repeats=repeats, device=device)[0][0]
            peak, kind = torch.cuda.max_memory_allocated(), "cuda-allocated"
        else:
            with _RssSampler() as sampler:
                latn = time_interleaved([many], warmup=warmup, rounds=1, repeats=repeats, device=device)[0][0]
            peak, kind = sampler.peak - sampler.start_rss, "cpu-rss-increase"
    return SpeedMetrics(
        device=device,
        threads=used_threads,
        seq_len=seq_len,
        batch_size=batch_size,
        warmup=warmup,
        repeats=repeats,
        latency_b1_ms=round(lat1 * 1000, 3),
        latency_bn_ms=round(latn * 1000, 3),
        throughput_per_s=round(batch_size / latn, 3),
        peak_memory_bytes=int(peak),
        peak_memory_kind=kind,
    )
