"""Publishing: the dry-run folder and its model card, and a real upload to a loopback stand-in Hub."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from compress import run
from compress.cli import main
from compress.hub import PublishError, PublishSpec, build_publish_folder

TOKEN = "hf_testtokenDoNotLeak0123456789abcdefXYZ"


class FakeHub:
    """Just enough of the Hub's HTTP API for huggingface_hub's create_repo + create_commit."""

    def __init__(self):
        self.repos, self.commits, self.auth = {}, [], []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.auth.append(self.headers.get("Authorization"))
                port = self.server.server_address[1]
                if self.path == "/api/repos/create":
                    req = json.loads(data)
                    repo = f"{req.get('organization')}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos[repo] = req
                    return self._reply(200, {"url": f"http://127.0.0.1:{port}/{repo}"})
                if self.path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(data)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False, "oid": None} for f in files]})
                if "/commit/" in self.path:
                    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                    files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                             for item in lines if item["key"] == "file"}
                    header = next(item["value"] for item in lines if item["key"] == "header")
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    hub.commits.append({"repo": repo, "summary": header["summary"], "files": files})
                    return self._reply(200, {"commitUrl": f"http://127.0.0.1:{port}/{repo}/commit/abc123",
                                             "commitOid": "abc123"})
                return self._reply(404, {"error": f"unexpected {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    from compress import testing

    out = tmp_path_factory.mktemp("published") / "run"
    recipe = testing.tiny_recipe(tiny_bert_dir, sentiment_csv, "sequence-classification", out,
                                 stages=[{"type": "finetune", "method": "full", "max_steps": 3, "batch_size": 8}],
                                 publish={"repo_id": "acme/tiny-compressed", "base_model": "acme/tiny-base",
                                          "license": "apache-2.0"})
    run(recipe)
    return out


def test_dry_run_folder_and_model_card(finished_run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    assert main(["push", str(finished_run), "--dry-run", "--output", str(tmp_path / "pub")]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "acme/tiny-compressed (private)" in out
    folder = tmp_path / "pub"
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "report.json",
                 "report.md", "report.html", "plots/pareto.png"):
        assert (folder / name).exists(), name
    assert not (folder / "stage.json").exists()
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "acme/tiny-base"
    assert card.data.library_name == "transformers" and "compress" in card.data.tags
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    report = json.loads((finished_run / "report.json").read_text())
    assert metrics["accuracy"] == report["points"][-1]["accuracy"]["accuracy"]
    assert "compress run recipe.yaml" in card.text and "| baseline |" in card.text
    assert (folder / "recipe.yaml").read_text().startswith("# compress run recipe.yaml")


@pytest.fixture
def online(monkeypatch):
    """The suite runs offline; the stand-in Hub lives on loopback, so let the client talk to it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def test_push_to_loopback_hub(finished_run, tmp_path, online, capsys, caplog):
    from compress.hub import push

    with FakeHub() as hub:
        result = push(finished_run, "acme/tiny-compressed", spec=PublishSpec(), output=tmp_path / "pub",
                      endpoint=hub.url)
    created = hub.repos["acme/tiny-compressed"]
    # Newer clients send `visibility`, older ones `private`.
    assert created.get("visibility") == "private" or created.get("private") is True
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == "acme/tiny-compressed"
    assert sorted(commit["files"]) == result["files"]
    assert commit["files"]["model.safetensors"] == (finished_run / "01-finetune" / "model.safetensors").read_bytes()
    assert all(a == f"Bearer {TOKEN}" for a in hub.auth)
    # The token is used, but never printed, logged or written anywhere.
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    for path in list(finished_run.rglob("*")) + list((tmp_path / "pub").rglob("*")):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for content in commit["files"].values():
        assert TOKEN.encode() not in content


def test_push_refuses_a_folder_containing_the_token(finished_run, tmp_path, monkeypatch, online):
    from compress import hub as hub_module

    real = hub_module.build_model_card
    monkeypatch.setattr(hub_module, "build_model_card", lambda *a, **k: real(*a, **k) + f"\n{TOKEN}\n")
    with FakeHub() as hub, pytest.raises(PublishError, match="contains your Hub token"):
        hub_module.push(finished_run, "acme/x", output=tmp_path / "pub", endpoint=hub.url)
    assert hub.commits == [] and hub.repos == {}


def test_push_needs_a_finished_run(tmp_path):
    with pytest.raises(PublishError, match="not a finished compress run"):
        build_publish_folder(tmp_path, tmp_path / "out", PublishSpec())


@pytest.mark.parametrize("stages,fmt", [
    ([{"type": "finetune", "method": "lora", "merge": "none", "max_steps": 2, "batch_size": 8}], "peft-adapter"),
    ([{"type": "prune", "method": "magnitude", "sparsity": 0.5},
      {"type": "quantize", "scheme": "int8-dynamic"}], "quantized"),
])
def test_published_folder_loads_as_its_card_says(stages, fmt, tiny_bert_dir, sentiment_csv, tmp_path):
    """A merge: none fine-tune carries its adapter (it was left out: the published weights were the
    untouched base); pruning masks stay behind; a compress-only format says it needs compress."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from compress import ModelBundle, testing

    out = tmp_path / "run"
    run(testing.tiny_recipe(tiny_bert_dir, sentiment_csv, "sequence-classification", out, stages=stages,
                            eval={"speed": False}))
    folder = build_publish_folder(out, tmp_path / "pub", PublishSpec(), "acme/x")
    card = (folder / "README.md").read_text()
    assert not (folder / "masks.safetensors").exists() and "pip install compress" not in card
    final = ModelBundle.load(next(out.glob(f"0{len(stages)}-*")))
    ids = torch.tensor([[2, 12, 20, 31, 8, 3]])
    with torch.no_grad():
        expected = final.model(input_ids=ids).logits
    if fmt == "peft-adapter":
        from peft import PeftModel

        assert 'PeftModel.from_pretrained(base, "acme/x", subfolder="adapter")' in card
        base = AutoModelForSequenceClassification.from_pretrained(str(folder))
        model = PeftModel.from_pretrained(base, str(folder), subfolder="adapter").eval()
    else:
        assert "declares a `model_type` naming compress" in card and "ModelBundle.load" in card
        with pytest.raises(ValueError, match="compress"):
            AutoModelForSequenceClassification.from_pretrained(str(folder))
        model = ModelBundle.load(folder).model
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)


def test_push_an_export_publishes_what_its_runtime_loads(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    """`compress push --export NAME`: the export's files, its runtime check in the card, no local paths."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification

    from compress import testing

    out = tmp_path / "run"
    recipe = testing.tiny_recipe(tiny_bert_dir, sentiment_csv, "sequence-classification", out,
                                 stages=[{"type": "quantize", "scheme": "int8-dynamic"}])
    run(recipe)
    assert main(["push", str(out), "--repo-id", "acme/x", "--export", "onnx", "--dry-run"]) == 2
    assert "--export onnx: " in capsys.readouterr().err
    assert main(["export", str(out), "--format", "compressed-tensors", "--eval-samples", "16"]) == 0
    assert main(["push", str(out), "--repo-id", "acme/x", "--export", "compressed-tensors", "--dry-run"]) == 0
    folder = out / "publish-compressed-tensors"
    facts = json.loads((folder / "export.json").read_text())
    assert facts["format"] == "compressed-tensors" and "folder" not in facts  # no local path leaves
    assert str(tmp_path) not in (folder / "README.md").read_text()
    card = ModelCard.load(folder / "README.md")
    assert "compressed-tensors" in card.data.tags and card.data.library_name == "transformers"
    assert "## Checked in its runtime" in card.text and "hf download acme/x --local-dir x" in card.text
    import torch

    # Plain transformers loads it, as the card says, into the very model the export checked.
    published = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    exported = AutoModelForSequenceClassification.from_pretrained(out / "exports" / "compressed-tensors").eval()
    ids = torch.tensor([[1, 5, 7, 2]])  # the tiny vocabulary
    with torch.no_grad():
        assert torch.equal(published(input_ids=ids).logits, exported(input_ids=ids).logits)
    # Unknown exports are named with the ones the run has.
    assert main(["push", str(out), "--repo-id", "acme/x", "--export", "gguf", "--dry-run"]) == 2
    assert "(exports: compressed-tensors)" in capsys.readouterr().err


def test_push_refuses_a_compress_only_format_unless_allowed(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    """A final model only compress loads is not published by accident: the refusal names --export and
    the flag; with the flag the folder is written and its card installs compress by its own
    distribution name (the one in pyproject, not the unrelated PyPI package `compress`)."""
    import tomllib
    from pathlib import Path

    from compress import DISTRIBUTION, testing
    from compress.hub import push

    out = tmp_path / "run"
    run(testing.tiny_recipe(tiny_bert_dir, sentiment_csv, "sequence-classification", out,
                            stages=[{"type": "quantize", "scheme": "int8-dynamic"}], eval={"speed": False}))
    assert main(["push", str(out), "--repo-id", "acme/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "in compress's own format 'quantized', which only compress loads" in err
    assert "--export NAME (write one first with `compress export" in err and "--allow-compress-format" in err
    assert not (out / "publish").exists()  # refused before anything was written
    with pytest.raises(PublishError, match="pass --allow-compress-format"):
        push(out, "acme/x", dry_run=True)
    # The recipe's publish section may allow it too (for publish.push_after_run).
    assert push(out, "acme/x", dry_run=True, spec=PublishSpec(allow_compress_format=True))["dry_run"]
    assert main(["push", str(out), "--repo-id", "acme/x", "--dry-run", "--allow-compress-format",
                 "--output", str(tmp_path / "pub")]) == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == DISTRIBUTION != "compress"
    assert pyproject["project"]["scripts"]["compress"] == "compress.cli:main"
    assert f"pip install -c requirements.lock -e .   # installs {DISTRIBUTION}" in card
    assert f"the distribution `{DISTRIBUTION}` (the PyPI package named `compress` is a different" in card
    assert "pip install compress" not in card
