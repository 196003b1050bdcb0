"""Command-line options generated from an options dataclass (:mod:`fastsr.options`): one
``add_argument`` per field, from its metadata, so an option is declared once."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..options import check_values, flag_of


def add_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the dataclass ``cls`` (help, choices, flag, group, metavar)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, argparse._ActionsContainer] = {None: p}
    for field in dataclasses.fields(cls):
        group = field.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(flag_of(field), dest=field.name, **_option_kwargs(field, hints[field.name]))


def options_from(args: argparse.Namespace, cls: type, error: type[Exception]):
    """The ``cls`` instance of the parsed ``args``; a value out of bounds raises ``error`` naming
    its flag (``--tile must be at least 1, got 0``)."""
    check_values(cls, lambda name: getattr(args, name), error, flag_of)
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def _option_kwargs(field: dataclasses.Field, hint: object) -> dict:
    """``add_argument`` keywords for ``field``: a bool is a switch (``--no-X`` too when on by default;
    a ``negated`` one turns it off), a field without a default is required, the others take a value
    of the field's type (or its ``parse``)."""
    meta, default = field.metadata, field.default
    help_text = meta["help"]
    if isinstance(default, bool):
        if meta["negated"]:
            return {"action": "store_false", "help": help_text}
        if default:
            return {"action": argparse.BooleanOptionalAction, "default": True, "help": f"{help_text} (default: on)"}
        return {"action": "store_true", "help": help_text}
    if default is dataclasses.MISSING:
        return {"required": True, "help": help_text}
    value_type = meta["parse"] or next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    kwargs = {"type": value_type, "default": default, "choices": meta["choices"]}
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    elif kwargs["choices"] is None:  # argparse names the value after the flag ({a,b} with choices)
        kwargs["metavar"] = flag_of(field).lstrip("-").replace("-", "_").upper()
    if default is not None and "(default" not in help_text:
        help_text += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
    return {**kwargs, "help": help_text}
