"""Settings declared once: a dataclass field per setting, its :class:`Option` in the field's metadata.

    @dataclass
    class MyConfig:
        epochs: int = Option("number of epochs", min=1)(60)   # section 3.3
        goodness: str = Option("goodness function", choices=("ssq", "neg_ssq"))("ssq")

From the fields alone, :func:`add_options` builds the command-line options (``--epochs N``,
``--goodness {ssq,neg_ssq}``; the type comes from the annotation, a bool becomes a flag, a
``tuple[int, int, int]`` takes three values, ``X | None`` takes an X) and :func:`check_options`
checks a value against its type, choices and bounds. Adding a setting is adding one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

OPTION = "ff_kernels.option"  # the metadata key of a field's Option


@dataclasses.dataclass(frozen=True)
class Option:
    """How one setting is described, parsed and checked.

    help: what the setting does; for a bool, what its flag does.
    choices: the allowed values, if only a few are.
    min, max, above, below: bounds of a number: ``min <= value <= max``, ``above < value < below``.
    flag: the command-line flag when it is not ``--field-name`` (a bool whose default is True
        gets ``--no-field-name`` unless ``flag`` names it otherwise).
    const: with ``flag``, the value the flag stores (the flag then takes no argument).
    none: what None means, shown in the help as the default (e.g. "all").
    metavar: argparse's metavar.
    positional: a positional argument of a command (no ``--``), for the analysis commands.
    detected: None means "found out when the run starts", and the run then stores what was found;
        a run resumed from a config saved as None accepts whatever is found.
    """

    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    flag: str | None = None
    const: Any = None
    none: str | None = None
    metavar: str | tuple[str, ...] | None = None
    positional: bool = False
    detected: bool = False

    def __call__(self, default: Any = dataclasses.MISSING) -> Any:
        """A dataclass field holding this option, with ``default`` (none: a required field)."""
        return dataclasses.field(default=default, metadata={OPTION: self})

    def but(self, **changes: Any) -> Option:
        """This option with some attributes changed, e.g. another help text for one recipe."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class FieldType:
    """A field's annotation, reduced: the element type, whether None is allowed, and the tuple
    length (``None``: not a tuple; ``...``: one or more)."""

    kind: type
    optional: bool
    length: int | type(Ellipsis) | None


def field_type(annotation: Any) -> FieldType:
    """The :class:`FieldType` of an annotation: int, float, str, bool, ``X | None``,
    ``tuple[X, X, X]`` or ``tuple[X, ...]``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported option annotation {annotation!r}")
        return dataclasses.replace(field_type(inner[0]), optional=True)
    if typing.get_origin(annotation) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return FieldType(args[0], False, Ellipsis)
        if len(set(args)) != 1:
            raise TypeError(f"unsupported option annotation {annotation!r}: a tuple of one element type")
        return FieldType(args[0], False, len(args))
    if annotation not in (int, float, str, bool):
        raise TypeError(f"unsupported option annotation {annotation!r}")
    return FieldType(annotation, False, None)


def option_fields(config_cls: type) -> list[tuple[dataclasses.Field, Option, FieldType]]:
    """The fields of a dataclass that carry an :class:`Option`, with their option and type."""
    hints = typing.get_type_hints(config_cls)
    return [(f, f.metadata[OPTION], field_type(hints[f.name]))
            for f in dataclasses.fields(config_cls) if OPTION in f.metadata]


def _describe(kind: type, option: Option) -> str:
    """'an int >= 1', 'a number > 0', 'one of (...)', ... for error messages."""
    if option.choices is not None:
        return f"one of {option.choices}"
    words = {int: "an int", float: "a number", str: "a string", bool: "True or False"}[kind]
    bounds = [f">= {option.min:g}" if option.min is not None else "",
              f"<= {option.max:g}" if option.max is not None else "",
              f"> {option.above:g}" if option.above is not None else "",
              f"< {option.below:g}" if option.below is not None else ""]
    return " ".join([words, " and ".join(b for b in bounds if b)]).strip()


def _check_value(name: str, value: Any, kind: type, option: Option) -> None:
    """Raise ValueError unless ``value`` is a ``kind`` that the option's choices and bounds allow."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and option.choices is not None:
        ok = value in option.choices
    if ok and kind in (int, float):
        ok = ((option.min is None or value >= option.min) and (option.max is None or value <= option.max)
              and (option.above is None or value > option.above) and (option.below is None or value < option.below))
    if not ok:
        raise ValueError(f"{name} must be {_describe(kind, option)}, got {value!r}")


def check_options(config: Any) -> None:
    """Check every :class:`Option` field of the dataclass instance ``config`` against its type,
    choices and bounds; raise ValueError naming the field, what it must be and what came.

    A tuple field given as a list (as config.json stores it) becomes a tuple.
    """
    for f, option, ftype in option_fields(type(config)):
        value = getattr(config, f.name)
        if value is None and ftype.optional:
            continue
        if ftype.length is None:
            _check_value(f.name, value, ftype.kind, option)
            continue
        expected = "one or more" if ftype.length is Ellipsis else str(ftype.length)
        if not isinstance(value, (tuple, list)) or (len(value) != ftype.length if ftype.length is not Ellipsis
                                                    else not value):
            raise ValueError(f"{f.name} must be {expected} values, each {_describe(ftype.kind, option)}, got {value!r}")
        for item in value:
            try:
                _check_value(f.name, item, ftype.kind, option)
            except ValueError:
                raise ValueError(f"{f.name} must be {expected} values, each {_describe(ftype.kind, option)}, "
                                 f"got {value!r}") from None
        object.__setattr__(config, f.name, tuple(value))  # also for a frozen dataclass


def _show_default(value: Any, option: Option) -> str:
    if value is None:
        return option.none or "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(_show_default(v, option) for v in value)
    return str(value)


def add_options(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = (),
                with_defaults: bool = False) -> None:
    """One command-line option (or positional argument) per :class:`Option` field of ``config_cls``
    (except those named in ``skip``), stored under the field's name.

    ``with_defaults``: the parsed namespace holds every field, the fields' defaults for those not
    given. Otherwise the parser's own ``argument_default`` applies; ``argparse.SUPPRESS`` there
    leaves out what was not given (``ff-train``: a resumed run keeps its saved values).
    """
    for f, option, ftype in option_fields(config_cls):
        if f.name in skip:
            continue
        has_default = f.default is not dataclasses.MISSING
        help_text = option.help
        kwargs: dict[str, Any] = {}
        if ftype.kind is bool and ftype.length is None:
            negate = has_default and f.default is True
            flag = option.flag or ("--no-" if negate else "--") + f.name.replace("_", "-")
            kwargs["action"] = "store_false" if negate else "store_true"
        else:
            flag = option.flag or "--" + f.name.replace("_", "-")
            if option.const is not None:
                kwargs.update(action="store_const", const=option.const)
            else:
                kwargs.update(type=ftype.kind, choices=option.choices, metavar=option.metavar)
                if ftype.length is not None:
                    kwargs["nargs"] = "+" if ftype.length is Ellipsis else ftype.length
            if has_default:
                help_text = f"{help_text} (default {_show_default(f.default, option)})"
        if with_defaults and has_default:
            kwargs["default"] = f.default
        if option.positional:
            parser.add_argument(f.name, help=help_text, **{k: v for k, v in kwargs.items() if k != "metavar"})
        else:
            parser.add_argument(flag, dest=f.name, help=help_text,
                                **{k: v for k, v in kwargs.items() if v is not None or k == "default"})
