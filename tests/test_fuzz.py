"""Fuzzing the recipe loader: any input ends as a valid Recipe or a RecipeError, never another exception."""

import pytest

from compress import Recipe, RecipeError, load_recipe
from compress.recipe_text import parse_yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEYS = ["name", "seed", "model", "data", "eval", "stages", "path", "task", "source", "type", "rank", "lr",
        "method", "sparsity", "goals", "accuracy", "max_drop", "output_dir", "publish", "repo_id", "batch_size",
        "text_column", "label_column", "epochs", "threads", "lm_eval", "tasks", "${HOME}", "x"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["finetune", "lora", "full", "causal-lm", "${NOPE}",
                                                           "${HOME:-x}", "pkg:nope/x", "../x", "runs/a"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)
RECIPES = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(RECIPES, st.lists(st.text(max_size=15), max_size=3))
def test_any_recipe_dict_is_valid_or_a_recipe_error(data, overrides):
    try:
        result = load_recipe(data, overrides)
    except RecipeError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
    else:
        assert isinstance(result, Recipe)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=300))
def test_any_yaml_text_is_a_mapping_or_a_recipe_error(text):
    try:
        data = parse_yaml(text)
    except RecipeError:
        return
    assert isinstance(data, dict)
