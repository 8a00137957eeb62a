"""Data: load a Hub id or local csv/json/jsonl/parquet/text, check it, split it, tokenise it.

Everything here is checked before a model is loaded: missing columns list the columns that exist,
empty splits name the split, undecodable text suggests `data.encoding`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import DataError
from compress.paths import looks_like_local_path, resolve_path
from compress.recipe import DataSpec

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

    def calibration(self, n: int | None = None, seed: int = 0) -> Any:
        """`n` training examples (default: data.calibration_samples), drawn with `seed`."""
        n = min(n or self.spec.calibration_samples, len(self.train))
        return self.train.shuffle(seed=seed).select(range(n))

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
    except Exception as exc:  # datasets wraps decode errors several layers deep
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
    if spec.eval_split is not None:
        if spec.eval_split not in raw:
            raise DataError(f"data.eval_split: no split {spec.eval_split!r}; available: {', '.join(raw)}")
        evaluation = raw[spec.eval_split]
        _check_columns(evaluation, spec, task, spec.eval_split)
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
        size = int(spec.eval_size) if spec.eval_size >= 1 else spec.eval_size
        if isinstance(size, int) and size >= len(train):
            raise DataError(f"data.eval_size: {size} held-out examples leaves nothing to train on "
                            f"({len(train)} rows); lower it or set data.eval_split")
        stratify = spec.label_column if task == "sequence-classification" else None
        try:
            parts = train.train_test_split(test_size=size, seed=seed, stratify_by_column=stratify)
        except ValueError:  # too few examples per class to stratify
            parts = train.train_test_split(test_size=size, seed=seed)
        train, evaluation = parts["train"], parts["test"]
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
    return DataBundle(spec=spec, task=task, train=train, eval=evaluation, label_names=label_names)


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


def _drop_missing(ds: Any, spec: DataSpec, task: str) -> Any:
    cols = list(_required_columns(spec, task).values())
    return ds.filter(lambda row: all(row[c] is not None and row[c] != "" for c in cols))


def _label_names(ds: Any, column: str) -> list[str]:
    values = ds.unique(column)
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def _encode_labels(ds: Any, column: str, names: list[str]) -> Any:
    import datasets

    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in ds.unique(column)} - set(index))
    if unknown:
        raise DataError(f"data.label_column: labels {unknown} of the held-out split are not in the training split")
    ds = ds.map(lambda row: {column: index[str(row[column])]})
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

