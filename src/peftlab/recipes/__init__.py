"""Recipes: each task's measured settings as a partial run configuration (`<task>.yaml` here), used as
`peftlab train --recipe NAME` (or `--recipe FILE.yaml`, any partial or whole config.yaml); `peftlab recipes` lists
them. Options and `--set SECTION.KEY=VALUE` on the command line override a recipe.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from peftlab.config import RunConfig
from peftlab.errors import PeftlabError
from peftlab.fileio import read_text

RECIPES_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """A packaged recipe by name, else a YAML file path."""
    packaged = RECIPES_DIR / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    path = Path(name)
    if path.is_file():
        return path
    raise PeftlabError(f"unknown recipe '{name}': expected one of {', '.join(recipe_names())} (see `peftlab recipes`) "
                       "or a YAML file")


def recipe_values(name: str) -> dict:
    """The recipe's settings as a mapping (checked later, with the options, by `RunConfig.from_dict`)."""
    path = recipe_path(name)
    try:
        values = yaml.safe_load(read_text(path, "recipe")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise PeftlabError(f"recipe {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise PeftlabError(f"{path}: expected a mapping of sections (task, adapter, train, ...), found "
                           f"{type(values).__name__}")
    check_recipe(path, values)
    return values


def check_recipe(path: Path, values: dict) -> None:
    """The recipe's own keys and types, checked as a (partial) config.yaml so that an error names the file; the
    whole configuration is checked again once the options are applied."""
    try:
        RunConfig.from_dict(values, where="")
    except PeftlabError as error:
        message = str(error)  # ".adapter.rank: expected int ..." or ": unknown key(s) ..." at the top level
        message = message[1:] if message.startswith(".") else message.removeprefix(": ")
        raise PeftlabError(f"recipe {path}: {message}") from None


def recipe_summary(name: str) -> str:
    """The recipe's comment lines (what it is and what it measured)."""
    lines = read_text(recipe_path(name), "recipe").splitlines()
    return " ".join(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
