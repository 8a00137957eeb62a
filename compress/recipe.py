"""Recipes: YAML (safe-loaded) -> pydantic models, with overrides, ${ENV} refs and all errors at once.

The same models are the Python API: `Recipe(model=ModelSpec(path=...), stages=[Finetune(...)])`
equals the recipe parsed from the YAML that says the same thing.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

import compress.stages  # noqa: F401  (registers the built-in stages: explicit imports, no discovery)
from compress.autotune import AutotuneSpec
from compress.errors import RecipeError
from compress.goals import Goal
from compress.hub import PublishSpec
from compress.methods import MethodFamily, family_of
from compress.recipe_text import apply_overrides, expand_env, find_secrets, parse_yaml
from compress.registry import StageConfig, registry_version, stage_entries

# The sections' specs live in a leaf module; re-exported here, where users look for them.
from compress.specs import DataSpec, DistributedSpec, EvalSpec, LmEvalSpec, ModelSpec, StrictModel

TASKS = ("causal-lm", "sequence-classification")
MAX_SEED = 2**32 - 1  # numpy's and transformers.set_seed's limit

__all__ = ["DataSpec", "DistributedSpec", "EvalSpec", "LmEvalSpec", "ModelSpec", "Recipe", "load_recipe"]


class Recipe(StrictModel):
    # `stages` is a discriminated union over the registered stage types, (re)built before each
    # validation when the registry changed, so the registry never reaches into this class.
    def __init__(self, **data: Any) -> None:
        ensure_stage_union()
        super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Recipe:  # type: ignore[override]
        ensure_stage_union()
        return super().model_validate(obj, **kwargs)

    name: str = Field(description="Run name; the default output folder is runs/<name>.")
    description: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for data splits, initialisation and training.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` uses a GPU when present.")
    output_dir: str | None = Field(None, description="Run folder; default runs/<name>.")
    model: ModelSpec
    data: DataSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    stages: list[StageConfig] = Field(default_factory=list, description="Ordered stages.")
    distributed: DistributedSpec | None = Field(
        None, description="FSDP or DeepSpeed settings for every training stage that sets none of its own.")
    autotune: AutotuneSpec | None = Field(None, description="Search space and budget for `compress autotune`.")
    publish: PublishSpec | None = Field(None, description="Defaults for `compress push` (repo_id, private, ...).")
    goals: dict[str, Goal] = Field(
        default_factory=dict, description="Targets for the final model against the baseline, e.g. "
        "{accuracy: {max_drop: 0.01}, latency_b32: {min_speedup: 2.0}}.")

    @model_validator(mode="after")
    def _stage_seeds_in_range(self) -> Recipe:
        # Stage i runs with seed + i + 1, which must stay within numpy's range too.
        if self.seed + len(self.stages) > MAX_SEED:
            raise ValueError(f"seed: stage {len(self.stages)} runs with seed + {len(self.stages)}, above "
                             f"{MAX_SEED} (2**32-1); use a seed <= {MAX_SEED - len(self.stages)}")
        return self

    @model_validator(mode="after")
    def _terminal_stages_last(self) -> Recipe:
        from compress.registry import get_stage

        terminal = [get_stage(s.stage_type()).terminal for s in self.stages]
        for index, stage in enumerate(self.stages):
            later = [s.stage_type() for s, t in zip(self.stages[index + 1:], terminal[index + 1:], strict=True)
                     if not t]
            if terminal[index] and later:
                kind = stage.stage_type()
                raise ValueError(f"stages[{index}]: {kind} is terminal; only other {kind} stages may follow it "
                                 f"(found {', '.join(later)}); move it to the end")
        return self

    @model_validator(mode="after")
    def _share_distributed_settings(self) -> Recipe:
        # Copied into the stages (not read from the recipe at train time) so a stage config alone says
        # how it trains: the resolved recipe shows it, and the stage, its checks and `compress plan`
        # read one place. A stage's own fsdp/deepspeed wins.
        from compress.registry import get_stage

        if self.distributed is None:
            return self
        for stage in self.stages:
            if (get_stage(stage.stage_type()).distributed and hasattr(stage, "fsdp")
                    and stage.fsdp is None and stage.deepspeed is None):
                stage.fsdp, stage.deepspeed = self.distributed.fsdp, self.distributed.deepspeed
                stage._sharding_from = "distributed"
        return self

    @model_validator(mode="after")
    def _lm_eval_needs_causal_lm(self) -> Recipe:
        if self.eval.lm_eval and self.model.task == "sequence-classification":
            raise ValueError("eval.lm_eval: harness tasks need a causal LM; remove eval.lm_eval or use task causal-lm")
        return self

    @model_validator(mode="after")
    def _known_goal_metrics(self) -> Recipe:
        from compress.goals import metric_getter, metric_names

        for name in self.goals:
            if metric_getter(name, self.eval.batch_size, self.eval.generate_batch_size) is None:
                valid = metric_names(self.eval.batch_size, self.eval.generate_batch_size)
                guess = difflib.get_close_matches(name, valid, n=1)
                hint = f"; did you mean {guess[0]!r}?" if guess else ""
                raise ValueError(f"goals.{name}: unknown metric{hint} (metrics: {', '.join(valid)}; "
                                 f"latency_bN needs N = eval.batch_size, decode_tps_bN N = "
                                 f"eval.generate_batch_size)")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("use letters, digits, '.', '_' or '-' (it names the output folder)")
        return value

    @field_validator("output_dir")
    @classmethod
    def _no_parent_escapes(cls, value: str | None) -> str | None:
        if value is not None and ".." in Path(value).parts:
            raise ValueError("must not contain '..'; give a folder below the current one or an absolute path")
        return value

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def to_dict(self, *, explicit_only: bool = False) -> dict[str, Any]:
        """The resolved recipe as plain data (what run.json and the report store).

        `explicit_only` keeps just the fields the recipe set (plus each stage's `type`): the form to
        validate again after changes, since a stage refuses settings that its other settings make
        meaningless (e.g. `double_quant` with an int8 scheme) and a full dump sets every default.
        """
        if not explicit_only:
            return self.model_dump(mode="json")
        data = self.model_dump(mode="json", exclude_unset=True)
        data["stages"] = [{"type": stage.stage_type(), **dumped}
                          for stage, dumped in zip(self.stages, data.get("stages", []), strict=True)]
        return data


_union_version = -1


def ensure_stage_union() -> None:
    """Make `Recipe.stages` a discriminated union on `type` over every registered stage."""
    global _union_version
    if _union_version == registry_version():
        return
    _union_version = registry_version()
    configs = tuple(entry.validation_type() for entry in stage_entries())
    item: Any = configs[0] if len(configs) == 1 else Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007
    Recipe.model_fields["stages"].annotation = list[item]
    Recipe.model_rebuild(force=True)


# --------------------------------------------------------------------------- loading


def load_recipe(
    source: str | Path | dict[str, Any] | Recipe,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Recipe:
    """Load and validate a recipe from a YAML path, a dict, or a Recipe. Raises RecipeError with every problem."""
    import copy

    if isinstance(source, Recipe):
        if not overrides:
            return source
        source = source.to_dict(explicit_only=True)
    label = None
    if isinstance(source, (str, Path)):
        label = str(source)
        path = Path(source)
        if path.is_dir():
            raise RecipeError(f"recipe file {label!r} is a folder; give the recipe's .yaml file")
        if not path.is_file():
            raise RecipeError(f"recipe file {label!r} does not exist")
        data = parse_yaml(_read_utf8(path, label), label)
    else:
        data = copy.deepcopy(source)
    try:
        data = apply_overrides(data, overrides)
    except RecipeError as exc:
        raise RecipeError(exc.problems, label) from None
    secrets = find_secrets(data)
    if secrets:
        raise RecipeError(secrets, label)
    data, env_problems = expand_env(data)
    problems = list(env_problems) + [p.replace("looks like", "expands to what looks like")
                                     for p in find_secrets(data)]
    if any("Hugging Face token" in p for p in problems):
        raise RecipeError(problems, label)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += format_validation_errors(exc, data)
        recipe = None
    if problems:
        raise RecipeError(problems, label)
    assert recipe is not None
    return recipe


def _read_utf8(path: Path, label: str) -> str:
    """The recipe's text; a file in another encoding is named with what is wrong and how to fix it."""
    raw = path.read_bytes()
    boms = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}
    for bom, name in boms.items():
        if raw.startswith(bom):
            raise RecipeError(f"the file is {name} text; recipes are UTF-8: save it as UTF-8 "
                              f"(e.g. `iconv -f UTF-16 -t UTF-8`)", label)
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"line {line}: byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8 "
                          f"(the file looks like {_guess_encoding(raw)}); recipes are UTF-8: save it as UTF-8, "
                          f"e.g. `iconv -f latin-1 -t UTF-8`", label) from None


def _guess_encoding(raw: bytes) -> str:
    return "UTF-16 without a byte-order mark" if raw.count(b"\x00") > len(raw) // 4 else "latin-1 or cp1252"


# --------------------------------------------------------------------------- error messages


def format_validation_errors(exc: ValidationError, data: Any = None) -> list[str]:
    """One line per pydantic error: `stages[2].sparsity: must be < 1`, with hints for unknown keys."""
    families = {entry.type: family_of(entry.config_cls) for entry in stage_entries()}
    lines = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        # Drop the discriminator tags pydantic puts after a list index (stages.2.prune.sparsity) and,
        # in a method family, after the stage's tag (stages.2.quantize.gptq.damp).
        clean: list[Any] = []
        family = None
        for i, part in enumerate(loc):
            if isinstance(part, str) and part in families and i > 0 and isinstance(loc[i - 1], int):
                family = families[part]
                continue
            if family is not None and loc[i - 1] in families and part in family.names():
                continue
            clean.append(part)
        method_tag = family is not None and loc[-1] in families
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            clean.append(family.key if method_tag else "type")
        message = _method_tag_message(err, family) if method_tag else _message(err, clean, data)
        # A whole-model validator names its field at the start ("pattern: ..."): make it part of the path.
        named = re.match(r"([a-z_][a-z0-9_]*): (.*)", message, re.DOTALL) if err["type"] == "value_error" else None
        if named and clean and named.group(1) in _valid_keys(clean, data):
            clean.append(named.group(1))
            message = named.group(2)
        where = _format_loc(clean)
        lines.append(f"{where}: {message}" if where else message)
    return lines


def _method_tag_message(err: dict[str, Any], family: MethodFamily) -> str:
    """A stage's method key missing or naming no registered method."""
    names = family.names()
    if err["type"] == "union_tag_not_found":
        return f"is required (one of: {', '.join(names)})"
    tag = str((err.get("ctx") or {}).get("tag"))
    guess = difflib.get_close_matches(tag, names, n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return f"unknown {family.key} {tag!r}{hint} (available: {', '.join(names)})"


def _format_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict[str, Any], loc: list[Any], data: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1], data)
        guess = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return f"unknown key{hint} (valid keys: {', '.join(valid)})"
    if kind == "missing":
        return "is required"
    if kind in ("less_than", "less_than_equal", "greater_than", "greater_than_equal"):
        op, bound = {"less_than": ("<", "lt"), "less_than_equal": ("<=", "le"),
                     "greater_than": (">", "gt"), "greater_than_equal": (">=", "ge")}[kind]
        limit = ctx[bound]
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"must be {op} {limit} (got {value!r})"
    if kind == "literal_error" and len(loc) == 3 and loc[0] == "stages" and loc[-1] == "type":
        kind, ctx = "union_tag_invalid", {"tag": value}  # one registered stage: no union, same message
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {value!r})"
    if kind == "union_tag_invalid":
        types = sorted(e.type for e in stage_entries())
        guess = difflib.get_close_matches(str(ctx.get("tag")), types, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return f"unknown stage type {ctx.get('tag')!r}{hint} (available: {', '.join(types)})"
    if kind == "union_tag_not_found":
        return f"each stage needs a `type` (one of: {', '.join(sorted(e.type for e in stage_entries()))})"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"][0].lower() + err["msg"][1:]
    return f"{msg} (got {value!r})" if value is not None and not isinstance(value, dict) else msg


def _valid_keys(loc: list[Any], data: Any) -> list[str]:
    """Field names of the model that sits at `loc` (used to suggest the closest valid key)."""
    model: Any = Recipe
    node = data
    for part in loc:
        parent = node
        if isinstance(node, (dict, list)):
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
        if isinstance(part, int):
            continue
        if isinstance(model, type) and issubclass(model, StageConfig) and isinstance(parent, dict):
            model = _stage_model(parent) or model  # a field inside a stage (compose's tasks): its own model
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_in(field.annotation, node)
    if isinstance(model, type) and issubclass(model, BaseModel):
        if model is StageConfig or (isinstance(node, dict) and "type" in node and model is not Recipe):
            model = _stage_model(node) or model
        return list(model.model_fields)
    return []


def _model_in(annotation: Any, node: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (list, Union) or str(origin) in ("typing.Annotated", "types.UnionType") or origin is not None:
        for arg in get_args(annotation):
            found = _model_in(arg, node)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if issubclass(annotation, StageConfig):
            return _stage_model(node) or annotation
        return annotation
    return None


def _stage_model(node: Any) -> type[BaseModel] | None:
    if isinstance(node, dict):
        for entry in stage_entries():
            if entry.type == node.get("type"):
                return entry.config_for(node)
    return None


