"""Plain SGD, the update ``d = -lr * g`` that CABS and EarlyStopping assume, told from an
optimizer's settings: a parameter group of a built optimizer, or a config's optimizer section.
No torch here: the diagnosis reads configs with it."""

from __future__ import annotations

from typing import Any, Mapping

PLAIN_SGD = "plain SGD only (no momentum, weight decay or Nesterov)"


def unlike_plain_sgd(name: str, settings: Mapping[str, Any], learning_rates: int = 1) -> str | None:
    """Say what makes an optimizer other than plain SGD, or ``None`` when it is plain SGD.

    Args:
        name: The optimizer's class name.
        settings: Its hyperparameters (``momentum``, ``weight_decay``, ``nesterov``, ``maximize``;
            absent ones at SGD's defaults).
        learning_rates: How many different learning rates its parameter groups have.

    Returns:
        ``"Adam"``, ``"SGD with momentum 0.9, nesterov"``, ..., or ``None``.
    """
    if name != "SGD":
        return name
    found = [f"{key} {settings[key]:g}" for key in ("momentum", "weight_decay") if isinstance(settings.get(key), (int, float)) and settings[key] != 0]
    found += [key for key in ("nesterov", "maximize") if settings.get(key)]
    if learning_rates > 1:
        found.append("several learning rates")
    return f"{name} with {', '.join(found)}" if found else None
