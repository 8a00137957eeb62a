"""Speed: median latency at batch 1 and batch N after warm-up, throughput, peak memory.

On CPU torch keeps no allocator statistics, so peak memory is the increase of the process's
resident set size, sampled by a background thread while the batch-N runs execute.
"""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from typing import Any

import torch

from compress.report.schema import SpeedMetrics


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


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

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _inputs(model: Any, tokenizer: Any, batch: int, seq_len: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low=min(1000, vocab // 2), high=vocab, size=(batch, seq_len), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _time(model: Any, inputs: dict[str, torch.Tensor], warmup: int, repeats: int, device: str) -> list[float]:
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


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
    model.eval()
    with _threads(threads) as used_threads:
        one = _inputs(model, tokenizer, 1, seq_len, device, seed)
        lat1 = statistics.median(_time(model, one, warmup, repeats, device))
        many = _inputs(model, tokenizer, batch_size, seq_len, device, seed)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            latn = statistics.median(_time(model, many, warmup, repeats, device))
            peak, kind = torch.cuda.max_memory_allocated(), "cuda-allocated"
        else:
            with _RssSampler() as sampler:
                latn = statistics.median(_time(model, many, warmup, repeats, device))
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
