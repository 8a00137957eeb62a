"""The open registry of quantized layer kinds: a new kind is one class and one registration, and it
saves, reloads and is counted like the built-in ones."""

import json
from typing import Any

import pytest
import torch
from torch import nn

from compress import ModelBundle, ModelError
from compress.quant import format as qformat
from compress.quant.accounting import size_summary
from compress.quant.kinds import _KINDS, register_layer_kind
from compress.quant.weight_only import WeightOnlyLinear


class HalfLinear(nn.Module):
    """A toy kind: fp16 weights (what a plugin scheme would register)."""

    kind = "test-fp16"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float16), requires_grad=False)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "HalfLinear":
        return cls(spec["in_features"], spec["out_features"])

    def size_facts(self) -> tuple[int, int, str, float]:
        return self.out_features, self.in_features, self.kind, 16.0

    def forward(self, x):
        return x @ self.qweight.float().T


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(_KINDS, HalfLinear.kind, HalfLinear)
    return HalfLinear


def _swap(bundle, name):
    old = bundle.model.get_submodule(name)
    layer = HalfLinear(old.in_features, old.out_features)
    layer.qweight.data.copy_(old.weight.detach().half())
    qformat.set_module(bundle.model, name, layer)


def test_a_registered_kind_saves_reloads_and_is_counted(toy_kind, tiny_llama_dir, tmp_path):
    bundle = ModelBundle.load(tiny_llama_dir)
    _swap(bundle, "model.layers.0.mlp.down_proj")
    bundle.format = qformat.FORMAT
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = bundle.model(input_ids=ids).logits
    bundle.save(tmp_path / "out")
    layer_map = json.loads((tmp_path / "out" / qformat.LAYER_MAP).read_text())
    assert layer_map["layers"] == {"model.layers.0.mlp.down_proj": {"kind": "test-fp16", "in_features": 128,
                                                                   "out_features": 64}}
    back = ModelBundle.load(tmp_path / "out")
    assert isinstance(back.model.get_submodule("model.layers.0.mlp.down_proj"), HalfLinear)
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, before)
    rows = size_summary(back.model)["layers"]
    assert [(r["layer"], r["kind"], r["bits_per_weight"], r["limit_bits_per_weight"]) for r in rows] == [
        ("model.layers.0.mlp.down_proj", "test-fp16", 16.0, 16.0)]


def test_an_unknown_kind_in_a_saved_folder_is_named(toy_kind, tiny_llama_dir, tmp_path, monkeypatch):
    bundle = ModelBundle.load(tiny_llama_dir)
    _swap(bundle, "model.layers.1.mlp.up_proj")
    bundle.format = qformat.FORMAT
    bundle.save(tmp_path / "out")
    monkeypatch.delitem(_KINDS, HalfLinear.kind)  # a reader without the plugin
    with pytest.raises(ModelError) as err:
        ModelBundle.load(tmp_path / "out")
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj: unknown quantized layer kind 'test-fp16'" in message
    assert "int8-dynamic" in message and "weight-only" in message


def test_registration_needs_the_protocol_and_refuses_a_taken_name():
    class NoSizes(nn.Module):
        kind = "test-incomplete"

        def spec(self):
            return {}

    with pytest.raises(TypeError, match="size_facts"):
        register_layer_kind(NoSizes)

    class Impostor(HalfLinear):
        kind = WeightOnlyLinear.kind

    with pytest.raises(ValueError, match="already registered by WeightOnlyLinear"):
        register_layer_kind(Impostor)


def test_int8_dynamic_holds_its_codes_once_after_packing(tmp_path):
    """fbgemm's packed copy replaces the plain codes when the layer is built or loaded (memory: one copy,
    not two); the codes read back exactly for saving, counting and verification, and reload bit-exact."""
    from safetensors.torch import load_model, save_model

    from compress.evaluate.size import count_parameters, memory_bytes
    from compress.quant.dynamic import DynamicInt8Linear

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight[:, ::2] = 0  # half the weights pruned: the count must see the zeros after packing
    layer = DynamicInt8Linear.from_linear(dense, per_token=True)
    assert layer.qweight.numel() == 0, "the plain codes are still held beside fbgemm's packed copy"
    codes = layer.codes()
    scale = dense.weight.detach().abs().amax(dim=1) / 127
    assert torch.equal(codes, torch.round(dense.weight.detach() / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8))
    x = torch.randn(3, 64)
    before = layer(x)
    assert torch.equal(layer.state_dict()["qweight"], codes)
    assert int(codes.count_nonzero()) <= 32 * 32  # small weights may round to zero as well
    assert count_parameters(layer) == (64 * 32 + 32, int(codes.count_nonzero()) + 32)
    assert memory_bytes(layer) == 64 * 32 + 4 * 32 + 4 * 32  # codes + scales + bias
    assert torch.allclose(layer.weight, codes.float() * layer.scales.unsqueeze(1))

    save_model(layer, str(tmp_path / "l.safetensors"))
    fresh = DynamicInt8Linear(64, 32, bias=True, per_token=True)
    load_model(fresh, str(tmp_path / "l.safetensors"))
    assert fresh.qweight.numel() == 0  # packed on load
    assert torch.equal(fresh.codes(), codes)
    assert torch.equal(fresh(x), before)
    # Loading into a layer that has released its codes repacks the new codes.
    layer.load_state_dict({**layer.state_dict(), "qweight": torch.zeros_like(codes)})
    assert torch.equal(layer.codes(), torch.zeros_like(codes))
    assert torch.equal(layer(x), torch.zeros(3, 32) + layer.bias)


def test_int8_dynamic_without_the_kernel_says_why_when_run(monkeypatch):
    """Without the fbgemm kernel the layer still builds, saves and reads back (so a saved model can be
    inspected), but a forward says why it cannot run instead of failing inside torch."""
    from compress.quant import dynamic

    monkeypatch.setattr(dynamic, "kernel_available", lambda: "this torch build has no quantized CPU engine")
    layer = dynamic.DynamicInt8Linear.from_linear(nn.Linear(16, 8))
    assert layer.qweight.numel() == 16 * 8  # kept unpacked: nothing to pack with
    with pytest.raises(RuntimeError, match="cannot run here: this torch build has no quantized CPU engine"):
        layer(torch.randn(2, 16))
