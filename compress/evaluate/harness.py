"""lm-evaluation-harness tasks on the in-memory model (causal LMs), through lm_eval's Python API."""

from __future__ import annotations

from typing import Any

from compress.errors import CompressError
from compress.specs import LmEvalSpec


def run_lm_eval(model: Any, tokenizer: Any, spec: LmEvalSpec, device: str = "cpu") -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for the given in-memory model."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CompressError("eval.lm_eval needs lm-eval: pip install 'compress-hf[harness]'") from None
    from compress.paths import resolve_path

    include = str(resolve_path(spec.include_path)) if spec.include_path else None
    manager = TaskManager(include_path=include)
    unknown = [t for t in spec.tasks if t not in manager.all_tasks]
    if unknown:
        raise CompressError(f"eval.lm_eval.tasks: unknown task(s) {unknown}; "
                            f"set eval.lm_eval.include_path to a folder holding their YAML")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=spec.tasks, task_manager=manager, limit=spec.limit,
                                  num_fewshot=spec.num_fewshot, log_samples=False)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool)
                         and "stderr" not in key}
    return results
