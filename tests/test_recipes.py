"""The shipped models' recipes (train/recipes/): what they give train.fit and train.fit_finder, and bad recipes."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import torch

from tests.conftest import ROOT
from train import fit, fit_finder
from train.recipe import parse_args

# The Makefile's TRAIN_ARGS before the recipe file: the arguments `make train` passed the shipped run.
TRAIN_ARGS_BEFORE = "--epochs 40 --time-limit 95 --no-balance --patience 0 --lr 1e-3"


def make_train_argv() -> list[str]:
    """The arguments `make train` passes train.fit today (dry run; the virtualenv taken as built)."""
    out = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "train"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    [line] = [x for x in out.splitlines() if "-m train.fit " in x]
    argv = shlex.split(line)
    return argv[argv.index("train.fit") + 1 :]


def test_make_train_gives_train_fit_the_arguments_it_gave_before():
    argv = make_train_argv()
    assert argv[:2] == ["--recipe", "train/recipes/oamen_pt.py"]
    now = parse_args(fit.get_args_parser(), [a if a != argv[1] else str(ROOT / a) for a in argv])
    rest = argv[2:]
    before = fit.get_args_parser().parse_args(rest + shlex.split(TRAIN_ARGS_BEFORE))
    assert vars(now) == vars(before)
    # the same types too (95.0, not 95): config.json and the checkpoint's config come out byte for byte
    assert json.dumps(vars(now), default=str) == json.dumps(vars(before), default=str)


def test_a_flag_on_the_command_line_overrides_the_recipe():
    recipe = str(ROOT / "train" / "recipes" / "oamen_pt.py")
    args = parse_args(fit.get_args_parser(), ["--recipe", recipe, "--epochs", "30", "--balance"])
    assert (args.epochs, args.balance, args.time_limit, args.lr) == (30, True, 95.0, 1e-3)
    assert not hasattr(args, "recipe")  # train.fit receives the resolved values only


def test_the_finder_recipe_is_what_the_shipped_finder_was_fitted_with():
    state = torch.load(ROOT / "weights" / "finder.pt", map_location="cpu", weights_only=True)
    trained = json.loads(state["trained"])
    args = parse_args(fit_finder.get_args_parser(), ["--recipe", str(ROOT / "train" / "recipes" / "finder.py")])
    assert {k: getattr(args, k) for k in trained} == trained
    assert args.version == json.loads(state["config"])["version"]
    assert args.framings == 0.0  # not in the record: the option came later, and its default is what ran


def test_a_bad_recipe_is_explained(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("epoch = 40\n")
    with pytest.raises(ValueError, match="'epoch' is not an argument of this command; valid: .*epochs"):
        parse_args(fit.get_args_parser(), ["--recipe", str(bad)])
    bad.write_text("import os\n")
    with pytest.raises(ValueError, match="only `name = value` lines"):
        parse_args(fit.get_args_parser(), ["--recipe", str(bad)])
    bad.write_text("loss = 'mse'\n")
    with pytest.raises(ValueError, match="choose one of"):
        parse_args(fit.get_args_parser(), ["--recipe", str(bad)])
