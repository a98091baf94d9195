"""The registry of problems: a plain dict from name to factory, filled by explicit imports."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cockpit_cli.errors import CockpitError, unknown_name_error
from problems.base import Problem, ProblemInfo

Factory = Callable[..., Problem]


@dataclass(frozen=True)
class RegisteredProblem:
    """A registry entry.

    The factory is called as ``factory(data_dir=Path, download=bool, seed=int, **options)``;
    its keyword-only parameters after those are the problem's options, validated by the config
    from their type hints and defaults.
    """

    info: ProblemInfo
    factory: Factory

    def option_defaults(self) -> dict[str, Any]:
        """Return ``{option: default}`` for the factory's problem-specific options."""
        signature = inspect.signature(self.factory)
        return {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if name not in COMMON_ARGUMENTS and parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def option_types(self) -> dict[str, Any]:
        """Return ``{option: annotation}`` for the problem-specific options (resolved types)."""
        hints = inspect.get_annotations(self.factory, eval_str=True)
        return {name: hints.get(name, Any) for name in self.option_defaults()}


COMMON_ARGUMENTS = ("data_dir", "download", "seed")
PROBLEMS: dict[str, RegisteredProblem] = {}


def register(info: ProblemInfo) -> Callable[[Factory], Factory]:
    """Register a factory under ``info.name``; registering a name twice is an error."""

    def decorate(factory: Factory) -> Factory:
        if info.name in PROBLEMS:
            raise ValueError(f"problem '{info.name}' is registered twice")
        PROBLEMS[info.name] = RegisteredProblem(info=info, factory=factory)
        return factory

    return decorate


def get_problem(name: str) -> RegisteredProblem:
    """Return the registry entry for ``name`` or raise a :class:`CockpitError` listing names."""
    try:
        return PROBLEMS[name]
    except KeyError:
        raise unknown_name_error("problem", name, PROBLEMS, "cockpit problems") from None


def build_problem(name: str, data_dir: Path, download: bool = False, seed: int = 42, **options: Any) -> Problem:
    """Build problem ``name`` with its data; the caller seeds torch first for the model init."""
    entry = get_problem(name)
    unknown = set(options) - set(entry.option_defaults())
    if unknown:
        raise CockpitError(f"problem '{name}' has no option(s) {sorted(unknown)}", f"its options: {sorted(entry.option_defaults())}")
    return entry.factory(data_dir=Path(data_dir), download=download, seed=seed, **options)
