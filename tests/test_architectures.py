"""The architecture matrix (issue #14): 16 tiny architectures x every stage. Each cell runs the
stage's check and run directly (no runner, no eval points), saves the output, reloads it and checks
the stage's promise; a refused cell must raise a CompressError saying why. The default run takes one
case per (architecture, stage family); `pytest -m slow` runs the full cross product.
Declarations live in tests/architecture_cases.py, which also generates the README's support table."""

from __future__ import annotations

import pytest

from compress.errors import CompressError, StageError
from compress.testing import TINY_ARCHITECTURES
from tests import support_table
from tests.architecture_cases import (
    CASES,
    PENDING,
    REFUSED,
    REPRESENTATIVE,
    Assets,
    check_promise,
    run_stage,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return Assets(tmp_path_factory.mktemp("matrix"))


def _cells(slow: bool) -> list:
    cells = []
    for arch in TINY_ARCHITECTURES:
        for case, (family, _) in CASES.items():
            if (REPRESENTATIVE[family] == case) == slow:
                continue
            marks = [pytest.mark.slow] if slow else []
            if (arch, case) in PENDING:
                marks.append(pytest.mark.xfail(reason=PENDING[arch, case], strict=False))
            cells.append(pytest.param(arch, case, marks=marks, id=f"{arch}-{case}"))
    return cells


def _check_cell(assets, arch, case, tmp_path):
    if (arch, case) in REFUSED:
        text, _ = REFUSED[arch, case]
        with pytest.raises(CompressError, match=text) as info:
            run_stage(assets, arch, case, tmp_path)
        assert len(str(info.value)) > 40  # a sentence that says why and what to do, not a bare name
        return
    before, out = run_stage(assets, arch, case, tmp_path)
    check_promise(before, out, case, tmp_path / "out")


@pytest.mark.parametrize(("arch", "case"), _cells(slow=False))
def test_representative_cell(assets, arch, case, tmp_path):
    _check_cell(assets, arch, case, tmp_path)


@pytest.mark.parametrize(("arch", "case"), _cells(slow=True))
def test_every_cell(assets, arch, case, tmp_path):
    _check_cell(assets, arch, case, tmp_path)


def test_readme_support_table_is_the_declared_matrix():
    """The committed table is regenerated from the declarations, never edited by hand."""
    assert support_table.committed_block() == support_table.render(support_table.declared())


def test_a_broken_mask_fails_the_prune_stage(assets, tmp_path, monkeypatch):
    """The prune stage's own check: a mask that is not applied is a StageError naming the layer."""
    from compress.stages import prune

    monkeypatch.setattr(prune.torch.Tensor, "mul_", lambda self, other: self)
    with pytest.raises(StageError, match=r"prune: layer model\.layers\.0\.\S+ holds \d+ non-zero weights"):
        run_stage(assets, "qwen2", "magnitude", tmp_path)


def test_a_missed_sparsity_target_fails_the_prune_stage(assets, tmp_path, monkeypatch):
    from compress.pruning import passes

    real = passes.unstructured_mask
    monkeypatch.setattr(passes, "unstructured_mask", lambda score, s, per_row: real(score, s / 2, per_row))
    with pytest.raises(StageError, match=r"layer \S+ reached sparsity 0\.2\d+, below its target 0\.5000"):
        run_stage(assets, "gpt2", "magnitude", tmp_path)


def test_a_broken_two_four_pattern_fails_the_prune_stage(assets, tmp_path, monkeypatch):
    from compress.pruning import passes

    real = passes.nm_mask
    monkeypatch.setattr(passes, "nm_mask", lambda score, n, m: real(score, 3, m))
    with pytest.raises(StageError, match=r"breaks the 2:4 pattern: a group of 4 inputs keeps 3"):
        run_stage(assets, "falcon", "magnitude-2:4", tmp_path)


def test_structured_output_whose_config_was_not_rewritten_fails(assets, tmp_path, monkeypatch):
    """If removal forgot the config, from_pretrained could not reload: the stage says which weight."""
    from compress.pruning import structured

    real = structured.remove_ffn_channels

    def forgetful(arch, keep):
        size = arch.config.intermediate_size
        real(arch, keep)
        arch.config.intermediate_size = size

    monkeypatch.setattr(structured, "remove_ffn_channels", forgetful)
    with pytest.raises(StageError, match=r"parameter \S+ has shape \(\d+, \d+\) but the pruned config builds"):
        run_stage(assets, "deberta-v2", "ffn", tmp_path)
