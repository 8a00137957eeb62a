"""The recipe's sections other than stages: model, data and eval specs.

A leaf module (pydantic and path helpers only), so data loading, model loading and evaluation can
use these specs without importing the recipe, which imports every stage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.paths import looks_like_local_path, resolve_path


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo never silently falls back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(StrictModel):
    path: str = Field(description="Hub id (org/name), local folder, or pkg:PACKAGE/sub/folder.")
    task: Literal["auto", "causal-lm", "sequence-classification"] = Field(
        "auto", description="Model task; `auto` reads it from the config's architectures."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype on load. `auto`: the checkpoint's own dtype (config.json "
        "`torch_dtype`/`dtype`); for a checkpoint that names none, bfloat16 on a GPU that supports it, else "
        "float32.")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub repo. Off by default.")
    allow_pickle: bool = Field(False, description="Load pickle weights (.bin/.pt), which can run code. Off by "
                                                  "default: safetensors only.")
    num_labels: int | None = Field(None, ge=2, description="Classifier labels; default: from the data.")
    gguf_file: str | None = Field(
        None, description="A GGUF file inside model.path (local folder or Hub repo) to load instead of "
        "safetensors. Its weights are dequantized to `dtype` on load, so every stage sees a plain model; "
        "needs `pip install gguf`. A local model.path ending in .gguf sets this by itself.")

    device_map: Literal["auto", "balanced", "sequential"] | dict[str, str | int] | None = Field(
        None, description="Place the base model's modules across devices (accelerate's device_map): `auto`, "
        "`balanced` or `sequential` within model.max_memory, or a mapping module name -> `cpu`, `disk`, "
        "`cuda:N` / N. Weights placed on `disk` (or on `cpu` in a GPU run) are offloaded and read in at each "
        "forward, so a model larger than memory can be evaluated; stages, which change weights, need every "
        "weight in memory on the run's device and are refused. Default: the whole model on the run's device.")
    max_memory: dict[str, str | int] | None = Field(
        None, description="With model.device_map: the most each device may hold, e.g. {cpu: 8GiB, '0': 70GiB}; "
        "what does not fit goes to the next device, then to disk (a safetensors checkpoint is read in place).")

    @field_validator("device_map")
    @classmethod
    def _device_names(cls, value: Any) -> Any:
        import re

        if isinstance(value, dict):
            bad = [f"{k}: {v!r}" for k, v in value.items()
                   if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                   and not (isinstance(v, str) and re.fullmatch(r"cpu|disk|mps|cuda(:\d+)?|\d+", v))]
            if bad:
                raise ValueError(f"devices must be cpu, disk, mps, cuda, cuda:N or a GPU index N; got {', '.join(bad)}")
            if not value:
                raise ValueError("an empty mapping places nothing; drop model.device_map or name the modules")
        return value

    @model_validator(mode="after")
    def _max_memory_needs_a_map(self) -> ModelSpec:
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory: it only limits model.device_map's placement; set model.device_map: auto, "
                             "or drop max_memory")
        return self

    @field_validator("path")
    @classmethod
    def _local_path_exists(cls, value: str) -> str:
        if looks_like_local_path(value):
            try:
                path = resolve_path(value)
            except FileNotFoundError as exc:
                raise ValueError(str(exc)) from None
            if not path.exists():
                raise ValueError(
                    f"folder {value!r} does not exist; give a local model folder (with config.json) "
                    f"or a Hub id like 'org/name'"
                )
        return value

    @model_validator(mode="after")
    def _gguf_readable(self) -> ModelSpec:
        import importlib.util

        named = self.gguf_file or (self.path if self.path.endswith(".gguf") else None)
        if named is None:
            return self
        if self.gguf_file and self.path.endswith(".gguf"):
            raise ValueError("gguf_file: model.path already names a .gguf file; give model.path as its folder, "
                             "or drop gguf_file")
        if self.gguf_file and looks_like_local_path(self.path):
            folder = resolve_path(self.path)
            if not (folder / self.gguf_file).is_file():
                found = sorted(f.name for f in folder.glob("*.gguf"))
                raise ValueError(f"gguf_file: {self.gguf_file!r} is not a file in {self.path!r}; "
                                 + (f"it holds {', '.join(found)}" if found else "it holds no .gguf file"))
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"gguf_file: reading {named!r} needs the gguf package; `pip install gguf`")
        return self


class DataSpec(StrictModel):
    source: str = Field(description="Local csv/json/jsonl/parquet/txt file or folder, pkg:PACKAGE/file, or Hub id.")
    format: Literal["auto", "csv", "json", "parquet", "text", "hub"] = Field(
        "auto", description="File format; `auto` uses the file extension (jsonl counts as json)."
    )
    encoding: str = Field("utf-8", description="Text encoding of csv/json/text files, e.g. latin-1.")
    text_column: str = Field("text", description="Column holding the input text.")
    text_pair_column: str | None = Field(None, description="Optional second text column (sentence pairs).")
    label_column: str | None = Field("label", description="Label column (classification).")
    prompt_column: str | None = Field(None, description="Causal LM: prompt column; loss only on the completion.")
    completion_column: str | None = Field(None, description="Causal LM: completion column (with prompt_column).")
    train_split: str = Field("train", description="Split used for training and calibration.")
    eval_split: str | None = Field(None, description="Held-out split; if unset, `eval_size` is cut from train.")
    eval_size: float = Field(0.1, gt=0, allow_inf_nan=False,
                             description="Held-out share (<1) or count (>=1) cut from train.")
    max_train_samples: int | None = Field(None, gt=0, description="Cap on training examples.")
    max_eval_samples: int | None = Field(None, gt=0, description="Cap on held-out examples.")
    max_length: int = Field(128, gt=0, le=32768, description="Tokens per example (truncation / LM block size).")
    calibration_samples: int = Field(128, gt=0, description=(
        "Calibration blocks of max_length tokens drawn from train (documents packed for language "
        "modelling, one example per block otherwise); only the drawn documents are tokenised."))


    @field_validator("eval_size")
    @classmethod
    def _whole_count(cls, value: float) -> float:
        if value >= 1 and not value.is_integer():
            raise ValueError(f"{value} is neither a share (below 1, e.g. 0.1) nor a whole count of examples "
                             f"(e.g. {int(value)}); write one of those")
        return value


class LmEvalSpec(StrictModel):
    """`eval.lm_eval`: which harness tasks to run at every eval point."""

    tasks: list[str] = Field(min_length=1, description="lm_eval task names (built-in or from include_path).")
    limit: int | None = Field(None, gt=0, description="Examples per task (None: all).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None: the task's default).")
    include_path: str | None = Field(None, description="Folder of local task YAMLs (offline tasks over local data).")
    batch_size: int = Field(8, gt=0, description="Batch size for the harness.")


class DistributedSpec(StrictModel):
    """Sharded training for the whole recipe: each training stage (finetune, distill) that sets neither
    `fsdp` nor `deepspeed` itself trains with these settings. The same keys as accelerate's plugins, so an
    accelerate config file and a recipe say the same thing."""

    fsdp: dict[str, Any] | None = Field(
        None, description="GPU only: keyword arguments for accelerate's FullyShardedDataParallelPlugin "
        "(e.g. {fsdp_version: 2, reshard_after_forward: true}).")
    deepspeed: dict[str, Any] | None = Field(
        None, description="GPU only: a DeepSpeed config (as a mapping) for accelerate's DeepSpeedPlugin, "
        "e.g. {zero_optimization: {stage: 3}}.")

    @model_validator(mode="after")
    def _one_kind(self) -> DistributedSpec:
        if self.fsdp is not None and self.deepspeed is not None:
            raise ValueError("fsdp and deepspeed exclude each other; keep one")
        if self.fsdp is None and self.deepspeed is None:
            raise ValueError("give fsdp or deepspeed (or remove the distributed section: plain data "
                             "parallelism needs no settings)")
        return self


class EvalSpec(StrictModel):
    baseline: bool = Field(True, description="Evaluate the model before any stage.")
    after_each_stage: bool = Field(True, description="Evaluate after every stage (a stage may opt out).")
    accuracy: bool = Field(True, description="Measure accuracy/perplexity on the held-out split.")
    speed: bool = Field(True, description="Measure latency, throughput and peak memory.")
    batch_size: int = Field(32, gt=0, description="Batch N for the speed test (batch 1 is always measured).")
    seq_len: int = Field(128, gt=0, description="Sequence length of the speed test inputs.")
    # Bounded: a typo like 1000000 would time the model for days before anything else ran.
    warmup: int = Field(2, ge=0, le=1000, description="Untimed warm-up runs before timing.")
    repeats: int = Field(5, gt=0, le=1000, description="Timed runs; the median is reported.")
    threads: int | None = Field(None, gt=0, description="torch threads for the speed test; default: torch's.")
    eval_batch_size: int = Field(64, gt=0, description="Batch size for the accuracy pass.")
    side_by_side: bool = Field(
        True, description="After the last stage, time every eval point's model again, all together in "
        "interleaved rounds (A B C A B C ...), so the reported speed ratios are not machine noise.")
    rounds: int = Field(5, gt=0, le=1000, description="Side-by-side rounds; each round runs every model "
                        "`repeats` times in turn. Ratios are taken round by round; their spread is reported.")
    side_by_side_mode: Literal["auto", "interleaved", "processes"] = Field(
        "auto", description="interleaved: all models in one process; processes: alternating fresh "
        "processes, one model each (for models too big to hold together); auto: processes only when "
        "the models would not fit in memory together.")
    memory: bool = Field(True, description="Measure each model's memory alone in a fresh process (GPU: "
                         "allocator statistics): resident bytes of the loaded model and the peak of a "
                         "batch-N forward (causal LMs: a batch-N generation).")
    generation: bool = Field(True, description="Causal LMs: time to first token and decode tokens/s "
                             "with the KV cache, side by side.")
    prompt_tokens: int = Field(128, gt=0, le=32768, description="Prompt length P for generation timing.")
    new_tokens: int = Field(32, gt=0, le=4096, description="Tokens G generated per timed generation.")
    generate_batch_size: int = Field(8, gt=0, le=1024, description="Batch N for decode tokens/s "
                                     "(batch 1 is always measured).")
    lm_eval: LmEvalSpec | None = Field(None, description="lm-evaluation-harness tasks (causal LMs).")
