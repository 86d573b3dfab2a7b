# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Two spellings of one setting: colt5's keyword and colt5-attention's (the reference package).

The routed layers take both packages' keywords, so that code written for colt5-attention runs with
`from colt5 import ...`. Where the two packages name the same setting differently, a layer takes both names with a
default of None ("not given") and resolves them here, so that two conflicting values are an error, not a choice.
"""

from __future__ import annotations

from typing import Any


def one_spelling(default: Any, **spellings: Any) -> Any:
    """The value of a setting given under any of several keyword names (None = not given).

    Args:
        default: the value when no spelling is given.
        **spellings: each keyword name with the value passed for it.

    Raises:
        ValueError: two spellings were given different values.
    """
    given = {name: value for name, value in spellings.items() if value is not None}
    values = list(given.values())
    if any(value != values[0] for value in values[1:]):
        names = " and ".join(f"{name}={value!r}" for name, value in given.items())
        raise ValueError(f"{names} name the same setting with different values: pass one of them.")
    return values[0] if values else default


def reject(name: str, value: Any, inert: Any, instead: str) -> None:
    """Raise a ValueError when a colt5-attention keyword that has no meaning here is set to anything but `inert`."""
    if value != inert:
        raise ValueError(f"{name}={value!r} has no meaning in colt5: {instead}")
