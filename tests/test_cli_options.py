"""Every ``ff-train`` recipe keeps its options and defaults, and options are generated from fields.

``data/ff_train_options.json`` was dumped from the hand-written parser (commit 284b846) before
the options were generated from the config fields: per recipe, every flag with its dest,
action, type, choices, nargs and const, and every config field's default. Options added since
are listed in :data:`ADDED`; a deliberate rename or change of default is listed in
:data:`CHANGED` with the commit that made it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from ff_kernels.paper.cli import build_parser
from ff_kernels.paper.options import Option, add_options, check_options
from ff_kernels.paper.recipes import RECIPES

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "ff_train_options.json").read_text())
ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
           argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const"}
MNIST_RECIPES = ("supervised", "jitter", "unsupervised", "local", "backprop", "recurrent")
# recipe -> flags added since the snapshot: --dataset (the IDX set: MNIST, Fashion-MNIST, KMNIST or unverified);
# --overwrite (a fresh run in a directory that holds files) and --debug (tracebacks instead of one-line
# errors), RunOptions of every recipe, added with the run-directory lock; --goodness-blocks (block-wise goodness,
# section 5.3) of the supervised recipe and the jitter recipe built on it
BLOCKWISE_RECIPES = ("supervised", "jitter")
ADDED: dict[str, set[str]] = {name: {"--overwrite", "--debug"} | ({"--dataset"} if name in MNIST_RECIPES else set())
                              | ({"--goodness-blocks"} if name in BLOCKWISE_RECIPES else set())
                              for name in SNAPSHOT}
ADDED["cifar"] |= {"--input-norm",  # each standardized image scaled to unit mean square (off by default)
                   "--label-scale"}  # the label vectors' size (1 by default: a plain one-hot label)
# recipe -> {field: default} of the fields added since the snapshot (or deliberately changed)
CHANGED: dict[str, dict[str, object]] = {name: {"dataset": None} | ({"goodness_blocks": None} if name in BLOCKWISE_RECIPES
                                                                    else {})
                                         for name in MNIST_RECIPES}
CHANGED["cifar"] = {"input_norm": False, "label_scale": 1.0}


def _recipe_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _describe(action: argparse.Action) -> dict:
    return {
        "dest": action.dest,
        "action": ACTIONS[type(action)],
        "type": action.type.__name__ if action.type else ("str" if type(action) is argparse._StoreAction else None),
        "choices": sorted(map(str, action.choices)) if action.choices else None,
        "nargs": action.nargs,
        "const": action.const,
    }


def test_every_recipe_is_in_the_snapshot():
    assert set(_recipe_parsers()) == set(SNAPSHOT)


@pytest.mark.parametrize("recipe", sorted(SNAPSHOT))
def test_options_are_unchanged(recipe):
    parser = _recipe_parsers()[recipe]
    options = {max(a.option_strings, key=len): _describe(a) for a in parser._actions
               if not isinstance(a, argparse._HelpAction)}
    expected = SNAPSHOT[recipe]["options"]
    assert set(options) - set(expected) == ADDED.get(recipe, set()), "options added without a note in ADDED"
    assert set(expected) <= set(options), f"options lost: {sorted(set(expected) - set(options))}"
    for flag, spec in expected.items():
        assert options[flag] == spec, flag


@pytest.mark.parametrize("recipe", sorted(SNAPSHOT))
def test_config_defaults_are_unchanged(recipe):
    config = RECIPES[recipe].Config()
    defaults = json.loads(json.dumps({f.name: getattr(config, f.name) for f in dataclasses.fields(config)}))
    assert defaults == {**SNAPSHOT[recipe]["config_defaults"], **CHANGED.get(recipe, {})}


def test_every_config_field_is_an_option():
    """One source of truth: each config field carries its Option (help, choices, bounds)."""
    for name, recipe in RECIPES.items():
        plain = [f.name for f in dataclasses.fields(recipe.Config) if "ff_kernels.option" not in f.metadata]
        assert not plain, f"{name}: fields without an Option: {plain}"


def test_parsed_options_build_the_config():
    parser = build_parser()
    args = vars(parser.parse_args(["local", "--channels", "4", "5", "6", "--length-norm", "--no-input-norm",
                                   "--lr", "0.01", "--train-subset", "7"]))
    assert args["channels"] == [4, 5, 6] and args["rms_norm"] is False and args["input_norm"] is False
    config = RECIPES["local"].Config(**{k: v for k, v in args.items() if k in {"channels", "rms_norm", "lr"}})
    assert config.channels == (4, 5, 6) and config.lr == 0.01
    bf16 = vars(parser.parse_args(["supervised", "--bf16"]))
    assert bf16["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in vars(parser.parse_args(["supervised"]))  # left out: the config's default


@dataclasses.dataclass
class _Toy:
    count: int = Option("a count", min=1)(3)
    rate: float = Option("a rate", above=0, max=1)(0.5)
    kind: str = Option("a kind", choices=("a", "b"))("a")
    cap: int | None = Option("a cap", min=0, none="no cap")(None)
    sizes: tuple[int, int] = Option("two sizes", min=1)((1, 2))
    on: bool = Option("turn it off", flag="--off")(True)
    extra: bool = Option("turn extra on")(False)

    def __post_init__(self):
        check_options(self)


@pytest.mark.parametrize("changes, message", [
    ({"count": 0}, "count must be an int >= 1, got 0"),
    ({"count": 2.0}, "count must be an int >= 1, got 2.0"),
    ({"count": True}, "count must be an int >= 1, got True"),
    ({"rate": 0}, "rate must be a number <= 1 and > 0, got 0"),
    ({"rate": float("nan")}, "rate must be a number <= 1 and > 0, got nan"),
    ({"rate": float("inf")}, "rate must be a number <= 1 and > 0, got inf"),
    ({"rate": "0.1"}, "rate must be a number"),
    ({"kind": "c"}, "kind must be one of ('a', 'b'), got 'c'"),
    ({"cap": -1}, "cap must be an int >= 0, got -1"),
    ({"sizes": (1,)}, "sizes must be 2 values, each an int >= 1, got (1,)"),
    ({"sizes": (1, 0)}, "sizes must be 2 values"),
    ({"on": 1}, "on must be True or False, got 1"),
])
def test_checks_name_the_field_what_it_must_be_and_what_came(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _Toy(**changes)


def test_checks_accept_good_values_and_turn_lists_into_tuples():
    toy = _Toy(count=5, rate=1, kind="b", cap=None, sizes=[3, 4], on=False)
    assert toy.sizes == (3, 4) and toy.rate == 1


def test_the_generated_parser_follows_the_annotations():
    parser = argparse.ArgumentParser()
    add_options(parser, _Toy, with_defaults=True)
    args = parser.parse_args(["--count", "4", "--rate", "0.25", "--kind", "b", "--cap", "9", "--sizes", "5", "6",
                              "--off", "--extra"])
    assert vars(args) == {"count": 4, "rate": 0.25, "kind": "b", "cap": 9, "sizes": [5, 6], "on": False, "extra": True}
    assert vars(parser.parse_args([])) == {"count": 3, "rate": 0.5, "kind": "a", "cap": None, "sizes": (1, 2),
                                           "on": True, "extra": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "c"])
    help_text = parser.format_help()
    assert "(default 3)" in help_text and "(default no cap)" in help_text and "(default 1 2)" in help_text
