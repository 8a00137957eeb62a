"""Data: load a Hub id or local csv/json/jsonl/parquet/text, check it, split it, tokenise it.

Everything here is checked before a model is loaded: missing columns list the columns that exist,
empty splits name the split, undecodable text suggests `data.encoding`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from compress.errors import DataError
from compress.paths import looks_like_local_path, resolve_path
from compress.specs import DataSpec

log = logging.getLogger("compress")

# Below this many held-out examples one example moves accuracy by more than 3 points: warn.
SMALL_EVAL = 30
# Integer label ids are class indices 0..N-1; ids far above the number of distinct ones would build
# a head with that many (mostly empty) classes, or exhaust memory naming them.
MAX_LABEL_GAP = 10

_EXT_FORMAT = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
               ".txt": "text", ".text": "text"}


@dataclass
class DataBundle:
    """The recipe's data after loading and splitting: raw `train`/`eval` datasets and label names."""

    spec: DataSpec
    task: str
    train: Any
    eval: Any
    label_names: list[str] | None = None
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def tokenized(self, split: str, tokenizer: Any) -> Any:
        """The split tokenised for the task (cached per tokenizer)."""
        key = (split, getattr(tokenizer, "name_or_path", "") + str(len(tokenizer)))
        if key not in self._cache:
            self._cache[key] = tokenize(getattr(self, split), tokenizer, self.spec, self.task)
        return self._cache[key]


# ---------------------------------------------------------------------------- loading


def _load_raw(spec: DataSpec) -> Any:
    import datasets

    datasets.disable_progress_bars()
    source = spec.source
    try:
        if looks_like_local_path(source):
            path = resolve_path(source)
            if not path.exists():
                raise DataError(f"data.source: {source!r} does not exist; give a local file or folder, or a Hub id")
            if path.is_dir():
                return datasets.load_dataset(str(path))
            fmt = spec.format if spec.format != "auto" else _EXT_FORMAT.get(path.suffix.lower())
            if fmt is None:
                raise DataError(f"data.format: cannot tell the format of {path.name!r}; "
                                f"set data.format to one of csv, json, parquet, text")
            kwargs: dict[str, Any] = {}
            if fmt in ("csv", "text", "json"):
                kwargs["encoding"] = spec.encoding
            if fmt == "csv" and path.suffix.lower() == ".tsv":
                kwargs["sep"] = "\t"
            return datasets.load_dataset(fmt, data_files={"train": str(path)}, **kwargs)
        return datasets.load_dataset(source)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets wraps decode errors several layers deep
        text = f"{exc} {exc.__cause__ or ''} {getattr(exc.__cause__, '__cause__', '') or ''}"
        if "corresponds to no data" in text or "No columns to parse" in text:
            raise DataError(f"data.source: {source!r} holds no rows; the split is empty") from None
        if "decode" in text or "UTF8" in text or "utf-8" in text:
            raise DataError(f"data.source: {source!r} is not valid {spec.encoding} text; "
                            f"set data.encoding (e.g. latin-1)") from None
        raise DataError(f"data.source: could not load {source!r}: {type(exc).__name__}: {exc}") from None


def load_data(spec: DataSpec, task: str, seed: int = 0) -> DataBundle:
    """Load, check and split the recipe's data. Raises DataError naming the field and the fix."""
    raw = _load_raw(spec)
    if spec.train_split not in raw:
        raise DataError(f"data.train_split: no split {spec.train_split!r}; available: {', '.join(raw)}")
    train = raw[spec.train_split]
    _check_columns(train, spec, task, spec.train_split)
    _check_text_columns(train, spec, task, spec.train_split)
    if spec.eval_split is not None:
        if spec.eval_split not in raw:
            raise DataError(f"data.eval_split: no split {spec.eval_split!r}; available: {', '.join(raw)}")
        evaluation = raw[spec.eval_split]
        _check_columns(evaluation, spec, task, spec.eval_split)
        _check_text_columns(evaluation, spec, task, spec.eval_split)
    else:
        evaluation = None
    train = _drop_missing(train, spec, task)
    if len(train) == 0:
        raise DataError(f"data.train_split: split {spec.train_split!r} of {spec.source!r} is empty")

    label_names = None
    if task == "sequence-classification":
        label_names = _label_names(train, spec.label_column)
        train = _encode_labels(train, spec.label_column, label_names)

    if evaluation is None:
        train, evaluation = _split(train, spec, task, seed)
    else:
        evaluation = _drop_missing(evaluation, spec, task)
        if task == "sequence-classification":
            evaluation = _encode_labels(evaluation, spec.label_column, label_names)
    if len(evaluation) == 0:
        raise DataError(f"data.eval_split: the held-out split of {spec.source!r} is empty")

    train = train.shuffle(seed=seed)
    if spec.max_train_samples:
        train = train.select(range(min(spec.max_train_samples, len(train))))
    if spec.max_eval_samples:
        evaluation = evaluation.select(range(min(spec.max_eval_samples, len(evaluation))))
    if len(evaluation) < SMALL_EVAL:
        log.warning("the held-out split has only %d example(s): one example moves accuracy by %.0f points, "
                    "so small differences between eval points are noise; raise data.eval_size%s or set "
                    "data.eval_split", len(evaluation), 100 / len(evaluation),
                    " / data.max_eval_samples" if spec.max_eval_samples else "")
    return DataBundle(spec=spec, task=task, train=train, eval=evaluation, label_names=label_names)


def _split(train: Any, spec: DataSpec, task: str, seed: int) -> tuple[Any, Any]:
    """Cut `eval_size` from train (stratified when every class allows it)."""
    rows = len(train)
    if rows < 2:
        raise DataError(f"data.source: {spec.source!r} has {rows} usable row after dropping empty ones; a run "
                        f"needs at least 2 (one to train on, one to hold out), and many more to measure anything")
    size = int(spec.eval_size) if spec.eval_size >= 1 else spec.eval_size
    if isinstance(size, int) and size >= rows:
        raise DataError(f"data.eval_size: {size} held-out examples leaves nothing to train on "
                        f"({rows} rows); lower it or set data.eval_split")
    # datasets rounds the held-out part up and the training part down
    if isinstance(size, float) and math.floor((1 - size) * rows) < 1:
        raise DataError(f"data.eval_size: a share of {size} of {rows} rows leaves nothing to train on; "
                        f"give a smaller share or a count, e.g. data.eval_size: {max(1, rows // 10)}")
    stratify = spec.label_column if task == "sequence-classification" else None
    try:
        parts = train.train_test_split(test_size=size, seed=seed, stratify_by_column=stratify)
    except ValueError:  # too few examples per class to stratify
        try:
            parts = train.train_test_split(test_size=size, seed=seed)
        except ValueError as exc:
            raise DataError(f"data.eval_size: cannot hold out {size} of {rows} rows ({exc}); "
                            f"give a count between 1 and {rows - 1}") from None
    return parts["train"], parts["test"]


def _required_columns(spec: DataSpec, task: str) -> dict[str, str]:
    cols = {}
    if spec.prompt_column or spec.completion_column:
        if not (spec.prompt_column and spec.completion_column):
            raise DataError("data.prompt_column and data.completion_column go together; set both")
        cols["data.prompt_column"] = spec.prompt_column
        cols["data.completion_column"] = spec.completion_column
    else:
        cols["data.text_column"] = spec.text_column
    if spec.text_pair_column:
        cols["data.text_pair_column"] = spec.text_pair_column
    if task == "sequence-classification":
        if not spec.label_column:
            raise DataError("data.label_column: a classifier needs a label column; set data.label_column")
        cols["data.label_column"] = spec.label_column
    return cols


def _check_columns(ds: Any, spec: DataSpec, task: str, split: str) -> None:
    missing = [f"{field}: column {col!r} is not in split {split!r}"
               for field, col in _required_columns(spec, task).items() if col not in ds.column_names]
    if missing:
        raise DataError("; ".join(missing) + f" (columns: {', '.join(ds.column_names)})")


_TEXT_DTYPES = ("string", "large_string")


def _check_text_columns(ds: Any, spec: DataSpec, task: str, split: str) -> None:
    """Text columns must hold text: a column of numbers is almost always the wrong column."""
    label_field = "data.label_column"
    for field_name, col in _required_columns(spec, task).items():
        if field_name == label_field:
            continue
        dtype = getattr(ds.features[col], "dtype", type(ds.features[col]).__name__)
        if dtype not in _TEXT_DTYPES:
            others = [c for c in ds.column_names
                      if getattr(ds.features[c], "dtype", None) in _TEXT_DTYPES and c != col]
            hint = f" (text columns: {', '.join(others)})" if others else " (the file has no text column)"
            raise DataError(f"{field_name}: column {col!r} of split {split!r} holds {dtype} values, not text; "
                            f"set {field_name} to the column with the text{hint}")


def _drop_missing(ds: Any, spec: DataSpec, task: str) -> Any:
    cols = list(_required_columns(spec, task).values())
    return ds.filter(lambda row: all(row[c] is not None and row[c] != "" for c in cols))


def _label_names(ds: Any, column: str) -> list[str]:
    """Class names from the training labels: ids 0..max for integer labels, else the sorted names."""
    field_name = f"data.label_column: column {column!r}"
    if getattr(ds.features[column], "dtype", None) in ("int64", "int32", "int16", "int8", *_TEXT_DTYPES):
        values = ds.unique(column)
    else:  # floats or mixed JSON values: arrow's unique() cannot compare them
        raw = ds[column]
        odd = [v for v in raw if isinstance(v, bool) or not isinstance(v, (int, float, str))]
        if odd:
            raise DataError(f"{field_name} holds values that are not labels (e.g. {odd[0]!r}); "
                            f"each row needs one class name or integer id")
        values = list(set(raw))
    real = [v for v in values if isinstance(v, float) and not (math.isfinite(v) and v.is_integer())]
    if real:
        raise DataError(f"{field_name} holds real numbers (e.g. {real[0]}); compress trains classifiers, "
                        f"which need class names or integer ids 0..N-1 — bin the values into classes first")
    values = [int(v) if isinstance(v, float) else v for v in values]
    numbers = [v for v in values if isinstance(v, int)]
    digits = [v for v in values if isinstance(v, str) and v.lstrip("-").isdigit()]
    names = [v for v in values if isinstance(v, str) and v not in digits]
    if (numbers or digits) and names:
        raise DataError(f"{field_name} mixes numbers ({', '.join(map(str, sorted(numbers or digits)[:3]))}) "
                        f"and names ({', '.join(sorted(names)[:3])}); use one kind for every row: all class "
                        f"names, or all integer ids 0..N-1")
    if len(values) < 2:
        raise DataError(f"{field_name} holds a single class ({values[0]!r}) in {len(ds)} row(s); a classifier "
                        f"needs at least 2 — check data.label_column and data.source (or the rows kept)")
    if len(values) > max(100, len(ds) // 2):
        raise DataError(f"{field_name} has {len(values)} distinct values in {len(ds)} rows, which looks like "
                        f"an id or text column, not classes; set data.label_column to the class column")
    if numbers and not names:
        if min(numbers) < 0:
            raise DataError(f"{field_name} holds negative ids ({min(numbers)}); ids are classes 0..N-1 "
                            f"(-1 usually marks unlabelled rows, e.g. a test split): drop those rows or use a "
                            f"labelled split")
        if max(numbers) + 1 > max(1000, MAX_LABEL_GAP * len(numbers)):
            raise DataError(f"{field_name} holds ids up to {max(numbers)} but only {len(numbers)} distinct "
                            f"ones; ids are class indices 0..N-1, so renumber them, or store the labels as "
                            f"text names (they are then numbered in sorted order)")
        return [str(i) for i in range(max(numbers) + 1)]
    return sorted(str(v) for v in values)


def _label_key(value: Any) -> str:
    # 2.0 (a float column, or JSON) names the same class as 2
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _encode_labels(ds: Any, column: str, names: list[str]) -> Any:
    import datasets

    index = {name: i for i, name in enumerate(names)}
    try:
        present = ds.unique(column)
    except Exception:  # noqa: BLE001 - arrow has no unique() for JSON-typed columns
        present = [v for v in ds[column] if isinstance(v, (int, float, str))]
    unknown = sorted({_label_key(v) for v in present} - set(index))
    if unknown:
        raise DataError(f"data.label_column: labels {unknown[:10]} of the held-out split are not in the training "
                        f"split ({', '.join(names[:10])}); hold out from the same label set")
    ds = ds.map(lambda row: {column: index[_label_key(row[column])]})
    return ds.cast_column(column, datasets.ClassLabel(names=names))


# ---------------------------------------------------------------------------- tokenising


def tokenize(ds: Any, tokenizer: Any, spec: DataSpec, task: str) -> Any:
    """Tokenise for the task. Classification -> input_ids/attention_mask/labels; causal LM -> blocks."""
    if task == "sequence-classification":
        def encode(batch: dict[str, list]) -> dict[str, list]:
            pair = batch[spec.text_pair_column] if spec.text_pair_column else None
            out = tokenizer(batch[spec.text_column], pair, truncation=True, max_length=spec.max_length)
            out["labels"] = batch[spec.label_column]
            return out
        return ds.map(encode, batched=True, remove_columns=ds.column_names)
    if spec.prompt_column:
        return ds.map(lambda b: _encode_prompt_completion(b, tokenizer, spec), batched=True,
                      remove_columns=ds.column_names)
    return _lm_blocks(ds, tokenizer, spec)


def _encode_prompt_completion(batch: dict[str, list], tokenizer: Any, spec: DataSpec) -> dict[str, list]:
    ids, labels = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for prompt, completion in zip(batch[spec.prompt_column], batch[spec.completion_column], strict=True):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        seq = (p + c)[: spec.max_length]
        ids.append(seq)
        # Loss only on the completion: prompt positions are -100 (ignored by cross-entropy).
        labels.append(([-100] * len(p) + c)[: spec.max_length])
    return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids], "labels": labels}


def _lm_blocks(ds: Any, tokenizer: Any, spec: DataSpec) -> Any:
    """Concatenate all text (EOS between documents) and cut it into blocks of max_length tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    block = spec.max_length

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream: list[int] = []
        for text in batch[spec.text_column]:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        usable = (len(stream) // block) * block
        blocks = [stream[i: i + block] for i in range(0, usable, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": blocks}

    out = ds.map(group, batched=True, batch_size=1000, remove_columns=ds.column_names)
    if len(out) == 0:
        raise DataError(f"data.max_length: the text yields no full block of {block} tokens; "
                        f"lower data.max_length or add text")
    return out


def pad_collate(tokenizer: Any):
    """Pad input_ids with the pad id, attention_mask with 0 and labels (if sequences) with -100."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in rows[0]:
                batch[key] = torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])
        if "labels" in rows[0]:
            first = rows[0]["labels"]
            if isinstance(first, (list, tuple)):
                batch["labels"] = torch.tensor([list(r["labels"]) + [-100] * (width - len(r["labels"]))
                                                for r in rows])
            else:
                batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch

    return collate

