"""Measure models one at a time, each in a fresh process: memory, and timing for models too big to share one.

`run_isolated(jobs)` starts one worker (`python -m compress.evaluate.isolated`) that imports torch
and transformers once and then forks a fresh child per job, in the order given: each child loads
one model, measures it and exits, so no model's memory (or freed-but-kept allocator pages) is seen
by another's. The worker never runs a torch op itself, so forking it is safe (no thread pools yet).

Memory on CPU is the resident set size (Linux /proc) above the level before the load: resident
once the model has run (memory-mapped weights count once read) and its buffers are freed, and the
peak (VmHWM, reset through /proc/self/clear_refs after loading) during the workload. On GPU it is
the caching allocator's statistics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from compress.errors import CompressError
from compress.evaluate.timing import check_stop

# Job keys: source ({"folder": path} or {"base": model spec dict, "task", "label_names", "seed"}),
# device, threads, memory (workload dict or None), timing (settings dict or None).


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:  # Linux >= 4.0: "5" resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so loading's temporaries do not count as the model."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_bytes(model: Any) -> int:
    """Bytes of every tensor in the model's state_dict (packed/quantized ones included), each once."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.is_meta or id(value) in seen:
                return
            seen.add(id(value))
            total += value.numel() * value.element_size()
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)

    for value in model.state_dict(keep_vars=True).values():
        add(value)
    return total


def _load(source: dict[str, Any], device: str) -> Any:
    from compress.bundle import ModelBundle

    if "folder" in source:
        return ModelBundle.load(source["folder"], device=device)
    from compress.loading import load_base_model
    from compress.recipe import ModelSpec

    data = SimpleNamespace(label_names=source.get("label_names"))
    return load_base_model(ModelSpec(**source["base"]), source["task"], data, device, source.get("seed", 0),
                           nf4=source.get("nf4"))


def _workload(bundle: Any, spec: dict[str, Any], device: str) -> tuple[Any, str]:
    from compress.evaluate.timing import forward_call, generate_call, model_vocab, random_ids

    vocab = model_vocab(bundle.model, bundle.tokenizer)
    if spec["kind"] == "generate":
        ids = random_ids(vocab, spec["batch"], spec["prompt"]).to(device)
        return (generate_call(bundle.model, ids, spec["new"], bundle.tokenizer.pad_token_id),
                f"generate {spec['batch']}x({spec['prompt']}+{spec['new']})")
    ids = random_ids(vocab, spec["batch"], spec["seq_len"]).to(device)
    return forward_call(bundle.model, ids), f"forward {spec['batch']}x{spec['seq_len']}"


def _measure_memory(job: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import gc

    import torch

    device = job["device"]
    # A first load and workload, thrown away: the lazy imports, kernel and thread-pool set-up and
    # tokenizer they bring (~150 MiB on CPU) belong to the process, not to the model.
    warm = _load(job["source"], device)
    _workload(warm, job["memory"], device)[0]()
    del warm
    gc.collect()
    _trim()
    if device.startswith("cuda"):
        torch.cuda.init()
        before = torch.cuda.memory_allocated()
        bundle = _load(job["source"], device)
        resident = torch.cuda.memory_allocated() - before
        call, what = _workload(bundle, job["memory"], device)
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        peak, kind = torch.cuda.max_memory_allocated() - before, "cuda-allocated"
    else:
        before = _status_kib("VmRSS")
        if before is None:
            raise CompressError("isolated memory needs Linux /proc (VmRSS); set eval.memory: false")
        bundle = _load(job["source"], device)
        call, what = _workload(bundle, job["memory"], device)
        if not _reset_peak():  # the load's own transients are not the workload's peak
            raise CompressError("cannot reset the peak RSS (/proc/self/clear_refs); set eval.memory: false")
        call()
        peak, kind = (_status_kib("VmHWM") - before) * 1024, "cpu-rss"
        # Resident after the workload, not right after the load: weights loaded from safetensors may be
        # memory-mapped and only become resident when first read (12.8 of MiniLM's 86.6 MiB right
        # after from_pretrained); the workload's own buffers are freed and handed back first.
        del call
        gc.collect()
        _trim()
        resident = (_status_kib("VmRSS") - before) * 1024
    return bundle, {"kind": kind, "resident_bytes": int(resident), "peak_bytes": int(peak), "workload": what,
                    "weight_bytes": tensor_bytes(bundle.model)}


def _measure_timing(bundle: Any, spec: dict[str, Any], device: str) -> dict[str, Any]:
    from compress.evaluate import timing

    model, vocab = bundle.model, timing.model_vocab(bundle.model, bundle.tokenizer)
    calls = [timing.forward_call(model, timing.random_ids(vocab, b, spec["seq_len"]).to(device))
             for b in (1, spec["batch"])]
    lat = timing.time_interleaved(calls, warmup=spec["warmup"], rounds=1, repeats=spec["repeats"], device=device,
                                  keep=spec.get("keep", "median"))
    out: dict[str, Any] = {"latency_b1_s": lat[0][0], "latency_bn_s": lat[1][0]}
    gen = spec.get("generate")
    if gen and bundle.task == "causal-lm":
        pad = bundle.tokenizer.pad_token_id
        for key, batch in (("b1", 1), ("bn", gen["batch"])):
            ids = timing.random_ids(vocab, batch, gen["prompt"]).to(device)
            res = timing.time_generation([model], ids, gen["new"], [pad], warmup=1, rounds=1, device=device)[0]
            out[f"decode_{key}_tps"] = res["decode_tps"][0]
            if batch == 1:
                out["ttft_s"] = res["ttft_s"][0]
    return out


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from compress.evaluate.timing import torch_threads

    with torch_threads(job.get("threads")) as threads:
        result: dict[str, Any] = {"threads": threads}
        bundle = None
        if job.get("memory"):
            bundle, result["memory"] = _measure_memory(job)
        if job.get("timing"):
            bundle = bundle or _load(job["source"], job["device"])
            bundle.model.eval()
            result["timing"] = _measure_timing(bundle, job["timing"], job["device"])
    del bundle, torch
    return result


def _serve(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for job in jobs:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the fresh process: measure one model, report, and leave without cleanup
            os.close(read_fd)
            try:
                payload = {"ok": _child(job)}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it with the model's name
                payload = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=5)}
            with os.fdopen(write_fd, "w") as fh:
                fh.write(json.dumps(payload))
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        results.append(json.loads(text) if text else {"error": f"measuring process died (status {status})"})
    return results


def run_isolated(jobs: list[dict[str, Any]], timeout: float | None = None,
                 stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Each job in its own fresh process, in order; returns one {"ok": ...} or {"error": ...} per job.

    The worker runs in its own session, so a terminal's Ctrl-C reaches only this process, whose
    handler sets `stop`; the worker is then ended here and MeasurementStopped raised (a Ctrl-C that
    killed the worker directly used to fail the finished run as a measuring error)."""
    if not jobs:
        return []
    check_stop(stop)
    root = str(Path(__file__).resolve().parents[2])  # this compress, whatever the installed one is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "compress.evaluate.isolated"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    pending: str | None = json.dumps(jobs)
    while True:
        try:
            stdout, stderr = proc.communicate(pending, timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pending = None  # the input was sent with the first call
            if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() > deadline):
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and the child measuring for it
                proc.communicate()
                check_stop(stop)
                raise CompressError(f"the isolated measuring process took longer than {timeout} s") from None
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        raise CompressError(f"the isolated measuring process failed (exit {proc.returncode}): "
                            f"{stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def main() -> None:
    jobs = json.loads(sys.stdin.read())
    # Imported once here, before any fork, so each child starts with the libraries loaded and no model.
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import compress.bundle
    import compress.loading  # noqa: F401

    print(json.dumps(_serve(jobs)), flush=True)


if __name__ == "__main__":
    main()
