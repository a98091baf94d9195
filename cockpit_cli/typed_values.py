"""Check a value read from YAML against a type hint, and describe the hint in words.

``check_value(3, float, "configs/x.yaml: optimizer.lr")`` returns ``3.0``; a wrong type or a
number out of bounds raises one :class:`CockpitError` line of the shape
``<file>: <key.path>: expected <description>, got <value>``.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from cockpit_cli.errors import CockpitError, did_you_mean


def describe(hint: Any) -> str:
    """Return a short human description of a type hint ("an integer", "one of 'a', 'b'")."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        inner = typing.get_args(hint)
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural[inner[0]]}" if inner and inner[0] in plural else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def check_value(value: Any, hint: Any, where: str, minimum: float | None = None, maximum: float | None = None) -> Any:
    """Check ``value`` against type ``hint``; return it converted (ints to floats, whole floats such
    as ``1e4`` to ints, lists to tuples).

    Args:
        value: The value from YAML.
        hint: A type hint: int, float, bool, str, Literal, list[X], tuple[X, ...], dict, X | None, Any.
        where: Prefix for the error message (``"<file>: <key.path>"``).
        minimum: Optional lower bound for numbers.
        maximum: Optional upper bound for numbers.

    Raises:
        CockpitError: ``"<where>: expected <description>, got <value>"``.
    """
    converted = _convert(value, hint)
    if converted is _INVALID:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        raise CockpitError(f"{where}: expected {describe(hint)}, got {shown}{_closest_choice(value, hint)}")
    if minimum is not None and isinstance(converted, (int, float)) and converted < minimum:
        raise CockpitError(f"{where}: expected a value >= {minimum:g}, got {converted!r}")
    if maximum is not None and isinstance(converted, (int, float)) and converted > maximum:
        raise CockpitError(f"{where}: expected a value <= {maximum:g}, got {converted!r}")
    return converted


_INVALID = object()


def _closest_choice(value: Any, hint: Any) -> str:
    """``"; did you mean 'economy'?"`` for a string that is a choice of a ``Literal`` hint in
    another case, or nearly the same (a similarity of 0.8: 'busines', not 'gpu' for 'cpu')."""
    choices = [choice for choice in typing.get_args(hint) if isinstance(choice, str)] if typing.get_origin(hint) is Literal else []
    if not choices or not isinstance(value, str):
        return ""
    same_but_case = [choice for choice in choices if choice.lower() == value.lower()]
    return f"; did you mean '{same_but_case[0]}'?" if same_but_case else did_you_mean(value, choices, cutoff=0.8)


def _convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            converted = _convert(value, option)
            if converted is not _INVALID:
                return converted
        return _INVALID
    if origin is Literal:
        return value if value in typing.get_args(hint) and not isinstance(value, bool) else _INVALID
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _INVALID
        inner = typing.get_args(hint)[:1] or (Any,)
        items = [_convert(item, inner[0]) for item in value]
        if any(item is _INVALID for item in items):
            return _INVALID
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        return dict(value) if isinstance(value, dict) else _INVALID
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # `steps: 1e4`
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _INVALID
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    return value if isinstance(value, hint) else _INVALID
