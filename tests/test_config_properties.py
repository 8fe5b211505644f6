"""Property tests of the recipe loader and the `--set` parser: any input loads or is a `UserError`, nothing else."""

import dataclasses
import math
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm import recipe as recipes
from tinylm.config import from_dict
from tinylm.errors import UserError
from tinylm.recipe import Recipe

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _sections() -> dict[str, list[str]]:
    """Every field name of every recipe section (one level down), so that generated keys are mostly real."""
    hints = typing.get_type_hints(Recipe)
    return {f.name: [g.name for g in dataclasses.fields(hints[f.name])]
            for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(hints[f.name])}


SECTIONS = _sections()
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["float32", "bfloat16", "adamw", "muon", "wsd", "micro", "tiny", "temperature", "text"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def recipe_dicts(draw):
    out = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS) + ["name", "bogus"]), max_size=4, unique=True)):
        if section in ("name", "bogus") or draw(st.integers(0, 9)) == 0:
            out[section] = draw(values)
            continue
        keys = st.sampled_from(SECTIONS[section] + ["unknown"])
        out[section] = draw(st.dictionaries(keys, values, max_size=4))
    return out


def _loads_or_user_error(load):
    try:
        recipe = load()
    except UserError as e:
        assert str(e)  # a message to show; the CLI folds it onto one line
        return None
    assert isinstance(recipe, Recipe)
    for value in (recipe.optim.lr, recipe.schedule.decay_frac, recipe.data.val_fraction):
        assert math.isfinite(value)
    return recipe


@PROFILE
@given(recipe_dicts())
def test_any_recipe_table_loads_or_is_a_user_error(data):
    recipe = _loads_or_user_error(lambda: from_dict(Recipe, data, "r.toml"))
    if recipe is not None:
        assert recipe.train.ckpt_every >= 1 and recipe.train.eval_rows >= 1 and recipe.optim.lr > 0


@PROFILE
@given(st.one_of(st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=200)))
def test_any_recipe_file_loads_or_is_a_user_error(tmp_path, content):
    path = tmp_path / "r.toml"
    path.write_bytes(content)
    _loads_or_user_error(lambda: recipes.load(path))


@PROFILE
@given(st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(sorted(SECTIONS)),
              st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys})),
              st.one_of(st.text(max_size=10), st.integers().map(str), st.floats().map(repr),
                        st.sampled_from(["true", "[1, 2]", "{a = 1}", "nan", "-inf", "'x'", "1e400"]))),
), max_size=4))
def test_any_set_flags_load_or_are_a_user_error(tmp_path, flags):
    path = tmp_path / "r.toml"
    path.write_text('[model]\npreset = "micro"\n[train]\nsteps = 3\n')
    _loads_or_user_error(lambda: recipes.load(path, flags))
