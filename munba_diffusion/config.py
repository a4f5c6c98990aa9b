"""Configurations declared once: each option's default, help and validation live on one dataclass field.

A command's configuration is a dataclass whose fields are made with :func:`option`. From it come

- validation (:func:`check_options`, called from the dataclass' ``__post_init__``): choices, numeric ranges,
  finiteness and types, with a one-line ``ValueError`` that names the field, its flag and what is allowed;
- the command-line parser (:func:`build_parser`): diffusers-style underscore flags (``--output_dir``) with hyphen
  aliases (``--output-dir``), the help text and default of every field;
- the parsed configuration (:func:`parse_config`), built by the dataclass itself so that the same checks run for
  Python callers and for the command line;
- the run record (:func:`config_record`): every field as plain JSON values, secrets left out.

Example::

    @dataclass
    class Settings:
        steps: int = option(10, "optimizer steps", low=1)
        mode: str = option("fast", "how to run", choices=("fast", "exact"))

        def __post_init__(self) -> None:
            check_options(self)

    Settings(steps=0)        # ValueError: steps (--steps) must be >= 1; got 0
    parse_config(Settings, ["--steps", "3", "--mode", "exact"])   # Settings(steps=3, mode='exact')
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")
_META = "munba_option"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """What :func:`option` records on a field (see its arguments)."""

    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    flag: str | None = None
    repeat: bool = False
    secret: bool = False
    cli: bool = True
    metavar: str | None = None
    required: bool = False
    positional: bool = False


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    choices: Sequence[Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    flag: str | None = None,
    repeat: bool = False,
    secret: bool = False,
    cli: bool = True,
    metavar: str | None = None,
    positional: bool = False,
) -> Any:
    """A dataclass field with its help text and rules.

    Args:
        default / default_factory: as for ``dataclasses.field``; neither means the option is required.
        help: the command-line help.
        choices: allowed values (each element of a list value must be one of them).
        low, high: inclusive numeric bounds (exclusive with ``low_open`` / ``high_open``); floats must be finite.
        flag: the command-line flag name without dashes when it differs from the field name; for a boolean
            that defaults to True it is the flag that turns it off (e.g. ``no_evaluation`` for ``evaluate``).
        repeat: a list option given once per value (``--concept a --concept b``) instead of ``--x a b``.
        secret: never written to run records, trackers or logs (tokens).
        cli: False for options only Python callers set.
        positional: a positional command-line argument (``munba-app OUTPUT_DIR``), named by ``metavar``.
    """
    spec = OptionSpec(
        help=help,
        choices=tuple(choices) if choices is not None else None,
        low=low,
        high=high,
        low_open=low_open,
        high_open=high_open,
        flag=flag,
        repeat=repeat,
        secret=secret,
        cli=cli,
        metavar=metavar,
        positional=positional,
        required=default is dataclasses.MISSING and default_factory is dataclasses.MISSING,
    )
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_META: spec})


def same_option(cls: type, name: str) -> Any:
    """A dataclass field declared as field ``name`` of the dataclass ``cls`` is (default, help, rules): a command
    that exposes a library option repeats no declaration. Give the field the same type annotation."""
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return dataclasses.field(default=field.default, default_factory=field.default_factory, metadata=field.metadata)


def _spec(field: dataclasses.Field) -> OptionSpec | None:
    return field.metadata.get(_META)


def flag_name(field: dataclasses.Field) -> str:
    """The command-line flag of ``field`` (``--name`` or its ``flag``; a positional argument's ``metavar``)."""
    spec = _spec(field)
    if spec and spec.positional:
        return spec.metavar or field.name.upper()
    return "--" + (spec.flag if spec and spec.flag else field.name)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else annotation), optional
    return annotation, False


def _element_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is a list) of a field annotation without its Optional."""
    if typing.get_origin(annotation) in (list, tuple, Sequence):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return _unwrap(args[0])[0] if args else str, True
    return annotation, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(field: dataclasses.Field) -> str:
    return f"{field.name} ({flag_name(field)})"


def _check_value(field: dataclasses.Field, spec: OptionSpec, kind: Any, value: Any) -> None:
    where = _describe(field)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be True or False; got {value!r}")
        return
    if kind in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int))
        ):
            raise ValueError(f"{where} must be {'an integer' if kind is int else 'a number'}; got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number; got {value!r}")
        if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
            raise ValueError(f"{where} must be {'>' if spec.low_open else '>='} {spec.low:g}; got {value!r}")
        if spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high):
            raise ValueError(f"{where} must be {'<' if spec.high_open else '<='} {spec.high:g}; got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{where} must be one of {', '.join(map(str, spec.choices))}; got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string; got {value!r}")


def check_options(config: Any) -> None:
    """Validate every :func:`option` field of the dataclass instance ``config`` (raise a one-line ValueError)."""
    hints = _field_types(type(config))
    for field in dataclasses.fields(config):
        spec = _spec(field)
        if spec is None:
            continue
        value = getattr(config, field.name)
        annotation, optional = _unwrap(hints[field.name])
        if value is None:
            if not optional:
                raise ValueError(f"{_describe(field)} is required")
            continue
        kind, is_list = _element_type(annotation)
        if is_list:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{_describe(field)} must be a list; got {value!r}")
            for item in value:
                if kind in (int, float, bool, str) or spec.choices is not None:
                    _check_value(field, spec, kind, item)
        elif kind in (int, float, bool, str) or spec.choices is not None:
            _check_value(field, spec, kind, value)


def _converter(kind: Any) -> Any:
    if kind is Path:
        return Path
    if kind in (int, float, str):
        return kind
    return str  # values of other types (e.g. a preset or a name) are parsed by the dataclass itself


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``prog: error: ... (see --help)``), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per :func:`option` field of ``cls`` (plus a hyphen alias)."""
    parser = OneLineErrorParser(
        prog=prog, description=description or cls.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        spec = _spec(field)
        if spec is None or not spec.cli:
            continue
        annotation, _ = _unwrap(hints[field.name])
        kind, is_list = _element_type(annotation)
        if spec.positional:
            optional = {} if spec.required else {"nargs": "?", "default": argparse.SUPPRESS}
            parser.add_argument(field.name, type=_converter(kind), help=spec.help, metavar=flag_name(field), **optional)
            continue
        flag = flag_name(field)
        names = [flag] + ([flag.replace("_", "-")] if "_" in flag else [])
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = spec.help + ("" if spec.required or default in (None, False) else f" (default: {default})")
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "default": argparse.SUPPRESS}
        if kind is bool and not is_list:
            kwargs["action"] = "store_false" if field.default is True else "store_true"
        else:
            kwargs["type"] = _converter(kind)
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
            if is_list:
                kwargs["action" if spec.repeat else "nargs"] = "append" if spec.repeat else "+"
        kwargs["required"] = spec.required
        parser.add_argument(*names, **kwargs)
    return parser


def parse_config(
    cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None, prog: str | None = None
) -> T:
    """Parse ``argv`` with :func:`build_parser` and build ``cls`` from it; a rule it breaks exits with one line."""
    parser = build_parser(cls, description, prog)
    values = vars(parser.parse_args(argv))
    try:
        return cls(**values)
    except (ValueError, OSError) as error:  # a broken rule, or a preset or prompt file that cannot be read
        parser.error(str(error))


def config_record(config: Any) -> dict[str, Any]:
    """The fields of ``config`` as JSON values (paths as strings, nested dataclasses as dicts), secrets left out."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if not (_spec(f) and _spec(f).secret)
            }
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    return plain(config)
