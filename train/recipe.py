"""Training recipes: a small Python file of plain assignments (``epochs = 40  # why``), one per shipped model.

`parse_args` reads ``--recipe FILE`` first; the recipe's values become the parser's defaults, so any
flag given on the command line still overrides them (nanoGPT's configurator does the same).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The ``name = literal`` assignments of a recipe file (comments and a docstring allowed, nothing else)."""
    text = Path(path).read_text()
    values: dict[str, Any] = {}
    for node in ast.parse(text, str(path)).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # the recipe's docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(
                f"{path}:{node.lineno}: a recipe holds only `name = value` lines, got {ast.unparse(node)!r}"
            )
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError as exc:
            raise ValueError(
                f"{path}:{node.lineno}: the value must be a literal (a number, a string, True, ...)"
            ) from exc
    return values


def recipe_defaults(
    parser: argparse.ArgumentParser, recipe: dict[str, Any], path: str | Path = "recipe"
) -> dict[str, Any]:
    """The recipe's values checked against ``parser`` and converted as the command line would convert them."""
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    out = {}
    for name, value in recipe.items():
        if name not in actions:
            raise ValueError(
                f"{path}: {name!r} is not an argument of this command; valid: {', '.join(sorted(actions))}"
            )
        action = actions[name]
        if value is not None and action.type is not None and not isinstance(value, bool):
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{path}: {name} = {value!r}: choose one of {list(action.choices)}")
        out[name] = value
    return out


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser``'s arguments with ``--recipe FILE`` read first: the recipe sets defaults, flags override."""
    parser.add_argument("--recipe", default=None, help="a recipe file (train/recipes/): its values are the defaults")
    known, _ = parser.parse_known_args(argv)
    if known.recipe:
        parser.set_defaults(**recipe_defaults(parser, load_recipe(known.recipe), known.recipe))
    args = parser.parse_args(argv)
    del args.recipe  # the command receives the resolved values only, as if every flag had been typed
    return args
