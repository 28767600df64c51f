"""The recipe settings: names, defaults with their sources, and bad values."""

from __future__ import annotations

import pytest

from safecode_kernels import ReleasedRecipe
from safecode_kernels.recipes import (
    RELEASED_CODE_KEYWORDS,
    RELEASED_CODE_LENGTH_CAPS,
    RELEASED_CODE_PHRASE_LIST,
    resolve_recipe,
)


def test_resolve():
    assert resolve_recipe("paper") == "paper" and resolve_recipe(" Released ") == ReleasedRecipe()
    custom = ReleasedRecipe(top_k=5)
    assert resolve_recipe(custom) is custom
    with pytest.raises(ValueError, match="'paper', 'released'"):
        resolve_recipe("fast")
    with pytest.raises(TypeError, match="recipe must be"):
        resolve_recipe(3)


def test_defaults():
    recipe = ReleasedRecipe()
    assert (recipe.alpha, recipe.top_k, recipe.lambda_boost, recipe.lambda_supp) == (0.3, 20, 1.0, 1.0)
    assert recipe.alpha_safe == pytest.approx(0.15) and recipe.suppress_factor == 0.5
    assert recipe.phrase_list == RELEASED_CODE_PHRASE_LIST and len(RELEASED_CODE_PHRASE_LIST) == 29
    assert len(set(RELEASED_CODE_PHRASE_LIST)) == 24  # the released list repeats five phrases
    # The released keyword "As an AI" is compared with lower-cased phrases: it never matches.
    assert "As an AI" in RELEASED_CODE_KEYWORDS
    assert not any("As an AI" in phrase.lower() for phrase in RELEASED_CODE_PHRASE_LIST)
    assert recipe.length_cap("llava", unsafe=True) == 20 and recipe.length_cap("qwen", unsafe=True) == 30
    assert recipe.length_cap("llava", unsafe=False) == 256 == RELEASED_CODE_LENGTH_CAPS["qwen"][1]
    with pytest.raises(ValueError, match="no released-code length cap for model family 'other'"):
        recipe.length_cap("other", unsafe=True)


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("alpha", -0.1, ValueError),
        ("alpha", "0.3", TypeError),
        ("lambda_supp", 2.5, ValueError),
        ("top_k", 0, ValueError),
        ("top_k", True, ValueError),
        ("safe_temperature", 0.0, ValueError),
        ("phrases", "I'm sorry", TypeError),
        ("keywords", [1], TypeError),
        ("continuation_safe", (0.8, 1.5), ValueError),
        ("length_caps", {"llava": (0, 5)}, ValueError),
    ],
)
def test_bad_values(field, value, error):
    with pytest.raises(error, match=field.split("_")[0]):
        ReleasedRecipe(**{field: value})


def test_phrases_become_a_tuple():
    assert ReleasedRecipe(phrases=["Sorry", "No"]).phrase_list == ("Sorry", "No")
