"""`--recipe recipes/NAME.toml` names a built-in recipe from any directory; a file of that path here wins."""

from __future__ import annotations

import tomllib

import pytest

from edgeprune.errors import ConfigError
from edgeprune.recipe import RECIPE_DIR, load_recipe, recipe_from_dict


def test_recipes_slash_name_is_the_built_in_file_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built_in = tomllib.loads((RECIPE_DIR / "llava-next-fast.toml").read_text())
    assert load_recipe("recipes/llava-next-fast.toml") == recipe_from_dict(built_in)
    assert load_recipe("recipes/llava-next-fast.toml").onnx.precision == "int4"


def test_a_file_of_that_path_in_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "llava-next-fast.toml").write_text("budget = 0.5\n")
    assert load_recipe("recipes/llava-next-fast.toml").budget == 0.5
    assert load_recipe("recipes/llava-next-fast.toml") != load_recipe(RECIPE_DIR / "llava-next-fast.toml")


def test_a_missing_recipe_still_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="recipe file recipes/nope.toml does not exist; pass --recipe"):
        load_recipe("recipes/nope.toml")
