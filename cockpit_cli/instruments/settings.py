"""From the ``instruments:`` config section to quantity objects with schedules."""

from __future__ import annotations

import math
from typing import Any

from cockpit_cli.config import RunConfig
from cockpit_cli.typed_values import check_value
from cockpit_cli.errors import CockpitError, did_you_mean
from cockpit_cli.instruments.presets import PRESETS
from cockpit_cli.instruments.quantities import QUANTITIES, Quantity
from cockpit_cli.instruments.schedules import SCHEDULE_KEYS, Schedule, schedule_from_settings

_SCHEDULE_TYPES: dict[str, tuple[Any, float | None]] = {"every": (int, 1), "offset": (int, 0), "spacing": (str, None), "points": (int, 1)}


def preset_schedule(config: RunConfig, total_steps: int) -> Schedule:
    """Return the schedule the preset's quantities share."""
    section = config.instruments
    return Schedule(every=section.every, offset=section.offset, spacing=section.spacing, points=section.points, last_step=max(total_steps - 1, 0))


def _check_entry(config: RunConfig, name: str, entry: Any) -> dict[str, Any] | None:
    """Validate ``quantities.<name>``; return its settings, or ``None`` when it is switched off."""
    path = f"instruments.quantities.{name}"
    if name not in QUANTITIES:
        raise config.fail(path, f"quantity '{name}' is unknown{did_you_mean(name, QUANTITIES)}", f"known: {', '.join(sorted(QUANTITIES))}")
    if entry is False:
        return None
    if entry is True or entry is None:
        return {}
    if not isinstance(entry, dict):
        raise config.fail(path, f"expected true, false or a mapping of settings, got {entry!r}")
    defaults = QUANTITIES[name].options_defaults
    settings: dict[str, Any] = {}
    for key, value in entry.items():
        where = config.where(f"{path}.{key}")
        if key in SCHEDULE_KEYS:
            kind, minimum = _SCHEDULE_TYPES[key]
            settings[key] = check_value(value, kind, where, minimum)
            if key == "spacing" and value not in ("linear", "log"):
                raise config.fail(f"{path}.{key}", f"expected 'linear' or 'log', got {value!r}")
        elif key in defaults:
            quantity = QUANTITIES[name]
            settings[key] = _like(defaults[key], value, where, quantity.options_minimums.get(key), quantity.options_maximums.get(key))
            if key == "range":
                _check_ranges(settings[key], where)
        else:
            known = [*SCHEDULE_KEYS, *defaults]
            raise config.fail(f"{path}.{key}", f"{name} has no setting '{key}'{did_you_mean(key, known)}", f"its settings: {', '.join(known)}")
    return settings


def _like(default: Any, value: Any, where: str, minimum: float | None = None, maximum: float | None = None) -> Any:
    """Check ``value`` against the type of ``default`` (numbers, booleans, nested pairs) and, for
    a number (or each number of a pair), against ``minimum`` (integers: at least 1 unless given)
    and ``maximum``."""
    if isinstance(default, bool):
        return check_value(value, bool, where)
    if isinstance(default, int):
        return check_value(value, int, where, 1 if minimum is None else minimum, maximum)
    if isinstance(default, float):
        return check_value(value, float, where, minimum, maximum)
    if isinstance(default, tuple):
        items = check_value(value, list[Any], where)
        if len(items) != len(default):
            raise CockpitError(f"{where}: expected {len(default)} values, got {len(items)}")
        return tuple(_like(d, v, where, minimum, maximum) for d, v in zip(default, items))
    return value


def _check_ranges(value: tuple, where: str) -> None:
    """Check a histogram range ``(low, high)``, or a pair of them: finite, with ``low < high``."""
    if all(isinstance(item, tuple) for item in value):
        for item in value:
            _check_ranges(item, where)
        return
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CockpitError(f"{where}: expected a range [low, high] of finite numbers with low < high, got [{low:g}, {high:g}]")


def build_quantities(config: RunConfig, total_steps: int) -> list[Quantity]:
    """Return the quantities of the preset plus the per-quantity additions and overrides."""
    shared = preset_schedule(config, total_steps)
    chosen: dict[str, dict[str, Any]] = {name: {} for name in PRESETS[config.instruments.preset]}
    for name, entry in config.instruments.quantities.items():
        settings = _check_entry(config, name, entry)
        if settings is None:
            chosen.pop(name, None)
        else:
            chosen[name] = settings
    quantities = []
    for name, settings in chosen.items():
        schedule = schedule_from_settings(settings, shared.last_step, shared) if set(settings) & set(SCHEDULE_KEYS) else shared
        options = {k: v for k, v in settings.items() if k not in SCHEDULE_KEYS}
        quantities.append(QUANTITIES[name](schedule, options))
    return quantities
