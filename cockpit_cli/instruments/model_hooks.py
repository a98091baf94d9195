"""Hooks the instruments put on the user's model, which copies of the model do not carry.

A training script copies its model (``copy.deepcopy``: an average of the weights, the best model
so far) or pickles it whole (``torch.save(model)``) while the instruments are attached. A hook
that is a bound method would drag the instruments into the copy (or fail to pickle); the copy
gets a hook that does nothing instead: the instruments follow the model they were attached to.
"""

from __future__ import annotations

from typing import Any, Callable


def _nothing(*args: Any) -> None:
    """What a copy of the model calls where the instruments' hook was."""
    return None


def _in_a_copy() -> Callable[..., None]:
    return _nothing


class ModelHook:
    """A hook of the instruments on a layer or parameter of the user's model (calls ``function``)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _nothing

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple]:
        return _in_a_copy, ()
