"""Every kind of folder `compress push --dry-run` writes, loaded exactly as its model card says, in a
fresh Python where `import compress` fails, gives the run's own outputs.

The card's own "How to load" snippet is what runs (taken from the card, with the repository id
replaced by the local folder), so a card that names the wrong class, forgets the adapter subfolder
or points at a file that was not published fails here. The outputs are compared with the run's
final model as compress itself loads it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress import DISTRIBUTION, run, testing
from compress.bundle import ModelBundle
from compress.cli import main
from compress.hub import final_stage_dir

pytestmark = pytest.mark.slow  # a run, a push and a fresh Python per kind: ~10 s each

REPO = "acme/x"
FAST = {"max_steps": 2, "batch_size": 8}
CLS, LM = "sequence-classification", "causal-lm"

# kind -> (task, stages, export format or None, bound on the logit difference relative to the largest
# logit). Plain Hugging Face outputs must give the run's logits to float precision; an export to the
# bound its own runtime check enforced (export.json's logit_tolerance: compressed-tensors' W8A8 uses
# 8-bit activations where compress's fbgemm kernel uses 7); bitsandbytes 4-bit to bf16 rounding, since
# on CPUs with AVX512-BF16 plain transformers takes bitsandbytes' bf16 path (compress pins fp32), as
# the card says.
KINDS = {
    "merged-lora": (CLS, [{"type": "finetune", "method": "lora", "merge": "merge", **FAST}], None, 1e-5),
    "peft-adapter": (CLS, [{"type": "finetune", "method": "lora", "merge": "none", **FAST}], None, 1e-5),
    "full-finetune": (CLS, [{"type": "finetune", "method": "full", **FAST}], None, 1e-5),
    "pruned-2:4": (LM, [{"type": "prune", "method": "magnitude", "structure": "n:m"}], None, 1e-5),
    "structured-heads": (LM, [{"type": "prune", "structure": "heads", "count": 2}], None, 1e-5),
    "structured-layers": (CLS, [{"type": "prune", "structure": "layers", "count": 1}], None, 1e-5),
    "structured-ffn": (LM, [{"type": "prune", "structure": "ffn", "sparsity": 0.25}], None, 1e-5),
    "trim-vocab": (LM, [{"type": "trim-vocab"}], None, 1e-5),
    "distilled": (LM, [{"type": "distill", "keep_layers": [1], **FAST}], None, 1e-5),
    "bnb-int8": (LM, [{"type": "quantize", "scheme": "int8"}], None, 1e-5),
    "bnb-nf4": (LM, [{"type": "quantize", "scheme": "nf4"}], None, 2e-2),
    "onnx-fp32": (CLS, [{"type": "export", "format": "onnx", "quantize": "none", "evaluate": False}], "onnx", 1e-4),
    "compressed-tensors-w8a8": (CLS, [{"type": "quantize", "scheme": "int8-dynamic"},
                                      {"type": "export", "format": "compressed-tensors", "evaluate": False}],
                                "compressed-tensors", None),
}

# Appended to the card's snippet: run the loaded model (or read the ONNX snippet's own logits) on a
# fixed text and save the token ids and logits for the comparison in the test process.
_PROBE = """
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
if "model" in globals():
    batch = AutoTokenizer.from_pretrained({folder!r})(["good movie with a bad plot"], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids = batch["input_ids"]
else:  # the ONNX snippet ran its session on its own text
    ids, out = torch.from_numpy(batch["input_ids"]), torch.from_numpy(logits)
save_file({{"input_ids": ids.contiguous(), "logits": out.float().contiguous()}}, "probe.safetensors")
try:
    import compress
    print("compress importable")
except ImportError:
    print("compress unavailable")
"""


def _card_snippet(card: str) -> str:
    """The first Python block of the card's "How to load" section."""
    section = card.split("## How to load", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert blocks, section
    return blocks[0]


def _run_without_compress(code: str, cwd: Path) -> subprocess.CompletedProcess:
    guard = "import sys\nsys.modules['compress'] = None  # as a Hub user without compress\n"
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, check=False, timeout=300)


def _publish(kind: str, tmp_path: Path, tiny_bert_dir, tiny_llama_dir, sentiment_csv, lm_text) -> tuple:
    task, stages, export, atol = KINDS[kind]
    model, data = (tiny_bert_dir, sentiment_csv) if task == CLS else (tiny_llama_dir, lm_text)
    out = tmp_path / "run"
    run(testing.tiny_recipe(model, data, task, out, stages=stages, eval={"speed": False}), show_progress=False)
    args = ["push", str(out), "--repo-id", REPO, "--dry-run"] + (["--export", export] if export else [])
    assert main(args) == 0
    folder = out / ("publish" if export is None else f"publish-{export}")
    return out, folder, atol


@pytest.mark.parametrize("kind", list(KINDS))
def test_published_folder_loads_as_its_card_says_without_compress(kind, tmp_path, tiny_bert_dir, tiny_llama_dir,
                                                                  sentiment_csv, lm_text):
    out, folder, atol = _publish(kind, tmp_path, tiny_bert_dir, tiny_llama_dir, sentiment_csv, lm_text)
    if atol is None:
        atol = json.loads((folder / "export.json").read_text())["logit_tolerance"]
    if kind == "bnb-nf4":
        assert "computes these 4-bit layers in bf16" in (folder / "README.md").read_text()
    assert not (folder / "masks.safetensors").exists()  # inference never needs the pruning masks
    snippet = _card_snippet((folder / "README.md").read_text())
    # The card's snippet runs as written; only the repository id becomes this folder (exports' snippets
    # run from inside the downloaded folder, as the card says).
    code = snippet.replace(f'"{REPO}"', repr(str(folder)))
    proc = _run_without_compress(code + _PROBE.format(folder=str(folder)), folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compress unavailable" in proc.stdout
    probe = load_file(str(folder / "probe.safetensors"))
    final = ModelBundle.load(final_stage_dir(out))  # the run's final model, as compress loads it
    ids = probe["input_ids"]
    with torch.no_grad():
        expected = final.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    got = probe["logits"]
    assert got.shape == expected.shape
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err <= atol, f"{kind}: relative logit difference {err:.3g} > {atol}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_compress_only_folder_refuses_plain_loading_and_names_the_install(tmp_path, tiny_bert_dir, sentiment_csv):
    """int8-dynamic (compress's own layers): plain from_pretrained, without compress, fails with a
    message naming compress, instead of loading random weights; the card's install line names the
    distribution, not the unrelated PyPI `compress`."""
    out = tmp_path / "run"
    run(testing.tiny_recipe(tiny_bert_dir, sentiment_csv, CLS, out, stages=[{"type": "quantize",
                            "scheme": "int8-dynamic"}], eval={"speed": False}), show_progress=False)
    assert main(["push", str(out), "--repo-id", REPO, "--dry-run", "--allow-compress-format"]) == 0
    folder = out / "publish"
    assert json.loads((folder / "config.json").read_text())["model_type"].startswith(f"{DISTRIBUTION} (install")
    card = (folder / "README.md").read_text()
    assert f"installs {DISTRIBUTION}" in card and "ModelBundle.load" in _card_snippet(card)
    proc = _run_without_compress(
        "from transformers import AutoModelForSequenceClassification\n"
        f"AutoModelForSequenceClassification.from_pretrained({str(folder)!r})\n", folder)
    # transformers quotes the model type in its refusal: that is where the user reads what to install.
    assert proc.returncode != 0 and f"has model type `{DISTRIBUTION} (install {DISTRIBUTION}, then " \
        "compress.ModelBundle.load; see the model card)`" in proc.stderr
