"""Options declared once: a dataclass field carries its default, type, help and bounds, and the
command line, the Python API and the validation all read them from there.

:class:`fastsr.training.config.TrainConfig` (``fastsr train``) and
:class:`fastsr.pipeline.options.UpscaleOptions` (``fastsr upscale``, ``upscale_file``,
``upscale_folder``, ``upscale_image``) are built this way; :mod:`fastsr.commands.options` turns
such a dataclass into argparse options. Depends on nothing of fastsr.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

Label = Callable[[dataclasses.Field], str]


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           flag: str | None = None, group: str | None = None, at_least: float | None = None,
           above: float | None = None, below: float | None = None, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, negated: bool = False,
           uses: frozenset[str] | None = None) -> Any:
    """A dataclass field and its command-line option.

    ``help`` text, allowed ``choices``, the ``flag`` (default: ``--`` + the field name with dashes),
    the help ``group`` it is listed in, its ``metavar``, and ``parse`` (str -> value) for a value
    argparse cannot convert from the type hint alone. A number may be bounded: ``at_least``
    (inclusive), ``above`` and ``below`` (exclusive); a float must be finite. ``negated``: a switch
    that turns the (default True) field off, e.g. ``--quiet`` for ``progress``. ``uses``: the
    functions that take the option (None: all). A field without a default is a required option.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "group": group, "at_least": at_least,
                "above": above, "below": below, "metavar": metavar, "parse": parse, "negated": negated,
                "uses": uses}
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of an :func:`option` field, e.g. ``--batch-size``."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def name_of(field: dataclasses.Field) -> str:
    """The field's Python name, e.g. ``batch_size``: how the API's messages name it."""
    return field.name


def problem(field: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is outside ``field``'s choices or bounds (e.g. "must be at least 1, got 0"), or
    None when it is fine. None (unset) and bools are not checked against bounds."""
    meta = field.metadata
    if value is None or isinstance(value, bool):
        return None
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    if not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if meta["at_least"] is not None and value < meta["at_least"]:
        return f"must be at least {meta['at_least']:g}, got {value:g}"
    if meta["above"] is not None and value <= meta["above"]:
        return f"must be greater than {meta['above']:g}, got {value:g}"
    if meta["below"] is not None and value >= meta["below"]:
        return f"must be less than {meta['below']:g}, got {value:g}"
    return None


def check_values(cls: type, values: Callable[[str], Any], error: type[Exception], label: Label = flag_of) -> None:
    """Raise ``error("<label> <problem>")`` for the first field of the dataclass ``cls`` whose value
    (``values(field name)``) is outside its choices or bounds."""
    for field in dataclasses.fields(cls):
        why = problem(field, values(field.name))
        if why is not None:
            raise error(f"{label(field)} {why}")


def fields_for(cls: type, use: str) -> Iterator[dataclasses.Field]:
    """The fields of ``cls`` that the function ``use`` takes (see :func:`option`'s ``uses``)."""
    for field in dataclasses.fields(cls):
        if field.metadata["uses"] is None or use in field.metadata["uses"]:
            yield field
