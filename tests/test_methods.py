"""Method families: methods inside a stage type as small configs in a discriminated union."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field, ValidationError

from compress import load_recipe, registry
from compress.errors import RecipeError
from compress.methods import MethodFamily, family_of
from compress.registry import StageConfig, register_stage


class Toy(StageConfig):
    """A toy stage with methods."""

    type: Literal["toy"] = "toy"
    method: str = Field("plain", description="Which toy method.")
    strength: float = 1.0


class Plain(Toy):
    """The plain method."""

    method: Literal["plain"] = "plain"


class Fancy(Toy):
    """The fancy method."""

    method: Literal["fancy"] = "fancy"
    flourish: int = Field(3, gt=0, description="How fancy.")


@pytest.fixture(scope="module")
def toy_family():
    family = MethodFamily(Toy, "method", default="plain")
    family.register(Plain, lambda config: "plain ran")
    family.register(Fancy, lambda config: f"fancy ran x{config.flourish}")
    register_stage(Toy, lambda bundle, config, ctx: bundle)
    yield family
    registry._STAGES.pop("toy")
    registry.note_registry_change()


def _recipe(stage: dict) -> dict:
    return {"name": "t", "model": {"path": "m"}, "data": {"source": "d.csv"}, "stages": [stage]}


def test_python_api_builds_the_methods_class(toy_family):
    fancy = Toy(method="fancy", flourish=5)
    assert type(fancy) is Fancy and isinstance(fancy, Toy) and fancy.flourish == 5
    assert type(Toy()) is Toy  # no keywords: what was asked for (copies and model_construct rely on it)
    assert type(Toy(strength=2.0)) is Plain  # the family's default method
    assert toy_family.handler(fancy)(fancy) == "fancy ran x5"
    with pytest.raises(ValidationError, match="flourish"):
        Toy(method="plain", flourish=5)  # another method's field
    with pytest.raises(ValueError, match=r"method: unknown 'fansy' \(available: plain, fancy\)"):
        Toy(method="fansy")
    assert family_of(Fancy) is toy_family


def test_recipe_validates_each_method_with_its_own_fields(toy_family):
    recipe = load_recipe(_recipe({"type": "toy", "method": "fancy", "flourish": 2}))
    assert type(recipe.stages[0]) is Fancy and recipe.stages[0].flourish == 2
    assert type(load_recipe(_recipe({"type": "toy"})).stages[0]) is Plain
    # Round trip through the dict form keeps the method.
    again = load_recipe(recipe.to_dict())
    assert type(again.stages[0]) is Fancy


@pytest.mark.parametrize(("stage", "message"), [
    ({"type": "toy", "method": "plain", "flourish": 2},
     "stages[0].flourish: unknown key (valid keys: name, evaluate, type, method, strength)"),
    ({"type": "toy", "method": "fancy", "flourish": 0}, "stages[0].flourish: must be > 0 (got 0)"),
    ({"type": "toy", "method": "fansy"},
     "stages[0].method: unknown method 'fansy'; did you mean 'fancy'? (available: plain, fancy)"),
    ({"type": "toy", "method": "fancy", "flourisj": 1}, "did you mean 'flourish'?"),
])
def test_recipe_errors_name_the_field_and_the_methods(toy_family, stage, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(_recipe(stage))
    assert message in str(caught.value)


def test_duplicate_and_malformed_methods_are_refused(toy_family):
    class Other(Toy):
        method: Literal["fancy"] = "fancy"

    with pytest.raises(ValueError, match="already registered by Fancy"):
        toy_family.register(Other)

    class NoLiteral(Toy):
        pass

    with pytest.raises(TypeError, match="needs `method: Literal"):
        toy_family.register(NoLiteral)
    with pytest.raises(TypeError, match="must subclass Toy"):
        toy_family.register(StageConfig)  # type: ignore[arg-type]
