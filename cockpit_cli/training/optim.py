"""Optimizer and learning-rate schedule construction from the config, with clear errors.

Any ``torch.optim`` optimizer and any ``torch.optim.lr_scheduler`` scheduler can be named; their
keyword arguments are checked against the class's signature (unknown names, wrong types by the
default's type) and then against torch itself, whose complaints are turned into one line.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from cockpit_cli.config import RunConfig
from cockpit_cli.typed_values import check_value
from cockpit_cli.errors import did_you_mean

# Arguments that are structural, not hyperparameters: the user never sets them in YAML.
_RESERVED_OPTIMIZER_ARGS = {"self", "params"}
_RESERVED_SCHEDULER_ARGS = {"self", "optimizer", "last_epoch", "verbose"}
# What torch raises for arguments it cannot work with, at construction or at a scheduler's step.
_TORCH_COMPLAINTS = (ValueError, TypeError, RuntimeError, ZeroDivisionError, IndexError)


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """Return every optimizer class ``torch.optim`` exports, by name."""
    return {
        name: obj
        for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }


def scheduler_classes() -> dict[str, type]:
    """Return every scheduler class ``torch.optim.lr_scheduler`` exports, by name."""
    base = torch.optim.lr_scheduler.LRScheduler
    return {
        name: obj
        for name, obj in vars(torch.optim.lr_scheduler).items()
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not name.startswith("_")
    }


def _check_arguments(config: RunConfig, section: str, cls: type, arguments: dict[str, Any], reserved: set[str]) -> dict[str, Any]:
    """Check ``arguments`` against ``cls.__init__``; return them converted by the defaults' types.

    A null argument is left out, so the class's default applies (``--set optimizer.momentum=null``
    gives SGD its default momentum, and after ``--set optimizer.name=Adam`` drops the file's SGD
    momentum, which Adam does not take).
    """
    parameters = {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in reserved and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    checked: dict[str, Any] = {}
    for key, value in arguments.items():
        if value is None:
            continue
        if key not in parameters:
            known = sorted(parameters)
            hint = f"its arguments: {', '.join(known)}"
            if config.overridden(f"{section}.name") and not config.overridden(f"{section}.{key}"):  # the file's arguments, meant for its own class
                hint = (
                    f"'{key}' comes from the file, written for another class; leave it out with --set {section}.{key}=null, "
                    f"or set the whole section instead, as in --set '{section}={{name: {cls.__name__}, ...}}'; {hint}"
                )
            raise config.fail(f"{section}.{key}", f"{cls.__name__} has no argument '{key}'{did_you_mean(key, known)}", hint)
        default = parameters[key].default
        checked[key] = _check_like_default(config, f"{section}.{key}", value, default)
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in checked]
    if missing:
        raise config.fail(f"{section}.{missing[0]}", f"{cls.__name__} needs argument '{missing[0]}'")
    return checked


def _check_like_default(config: RunConfig, path: str, value: Any, default: Any) -> Any:
    """Check ``value`` has the type the signature's default suggests (numbers, bools, tuples)."""
    where = config.where(path)
    if isinstance(default, bool):
        return check_value(value, bool, where)
    if isinstance(default, (int, float)) and not isinstance(value, bool) and isinstance(value, (int, float)):
        return value
    if isinstance(default, (int, float)):
        return check_value(value, float, where)
    if isinstance(default, tuple):
        return check_value(value, tuple[Any, ...], where)
    if isinstance(value, list):
        return tuple(value)
    return value


# Arguments of an optimizer that choose how its update is computed, not what it is.
IMPLEMENTATION_SWITCHES = {"foreach", "fused", "differentiable", "capturable"}


def hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Return the hyperparameters of ``optimizer`` (``lr``, ``momentum``, ...: its constructor's
    arguments) with their values in its first parameter group, as plain values, as a config's
    optimizer section holds them. A one-element tensor becomes its number; switches such as
    ``foreach`` and what schedulers add to a group (``initial_lr``, ``max_lr``) are left out."""
    group, found = optimizer.param_groups[0], {}
    for key in optimizer.defaults:
        value = group.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if key not in IMPLEMENTATION_SWITCHES and isinstance(value, (bool, int, float, str, tuple, list, type(None))):
            found[key] = value
    return found


def undrivable(cls: type) -> str | None:
    """Say why the training loop, one backward pass and one ``optimizer.step()`` per step on
    dense gradients, cannot drive optimizer class ``cls``, or return ``None``."""
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:  # LBFGS
        return "needs a closure that evaluates the loss again within each step, which the training loop does not take"
    if cls.__name__ == "SparseAdam":
        return "takes sparse gradients only, which the problems' layers do not give"
    return None


def build_optimizer(config: RunConfig, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Build the configured optimizer over ``parameters``.

    Raises:
        CockpitError: unknown optimizer, unknown or ill-typed argument, or a value torch rejects.
    """
    classes = optimizer_classes()
    name = config.optimizer.name
    if name not in classes:
        raise config.fail("optimizer.name", f"optimizer '{name}' is not in torch.optim{did_you_mean(name, classes)}", f"known: {', '.join(sorted(classes))}")
    cls = classes[name]
    obstacle = undrivable(cls)
    if obstacle is not None:
        raise config.fail("optimizer.name", f"{name} {obstacle}", "use another torch.optim optimizer (SGD, Adam, AdamW, ...)")
    arguments = _check_arguments(config, "optimizer", cls, config.optimizer.arguments, _RESERVED_OPTIMIZER_ARGS)
    try:
        return cls(list(parameters), **arguments)
    except (ValueError, TypeError, RuntimeError) as error:
        raise config.fail("optimizer", f"torch.optim.{name} rejected the arguments: {error}") from None


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> Any | None:
    """Build the configured learning-rate scheduler, or return ``None`` without a ``schedule``."""
    schedule = config.schedule
    if schedule is None:
        return None
    classes = scheduler_classes()
    if schedule.name not in classes:
        raise config.fail(
            "schedule.name",
            f"scheduler '{schedule.name}' is not in torch.optim.lr_scheduler{did_you_mean(schedule.name, classes)}",
            f"known: {', '.join(sorted(classes))}",
        )
    cls = classes[schedule.name]
    if cls.__name__ in ("ReduceLROnPlateau", "SequentialLR", "ChainedScheduler", "LambdaLR", "MultiplicativeLR"):
        raise config.fail("schedule.name", f"{cls.__name__} needs Python objects or a metric and cannot be configured from YAML", "use StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, OneCycleLR, ...")
    arguments = _check_arguments(config, "schedule", cls, schedule.arguments, _RESERVED_SCHEDULER_ARGS)
    try:
        return cls(optimizer, **arguments)
    except _TORCH_COMPLAINTS as error:
        raise config.fail("schedule", f"torch.optim.lr_scheduler.{schedule.name} rejected the arguments: {error}") from None


@dataclass(frozen=True)
class LearningRatePlan:
    """The learning rates a schedule gives the run's steps (those of the first parameter group)."""

    first: float
    last: float
    lowest: float
    highest: float

    def describe(self) -> str:
        return f"{self.first:.4g} at the start, {self.last:.4g} at the end (lowest {self.lowest:.4g}, highest {self.highest:.4g})"


def rehearse_schedule(config: RunConfig, stepped: int, used: int) -> LearningRatePlan | None:
    """Step a copy of the configured schedule as often as the run will, on a scratch optimizer
    (one parameter of one number, the config's optimizer arguments), before training.

    Torch checks some arguments only when a scheduler steps: StepLR's ``step_size: 0`` divides by
    zero at its first step, and OneCycleLR refuses to step beyond its ``total_steps``.

    Args:
        config: The run's config.
        stepped: How often the run steps the scheduler (after every step, or every finished epoch).
        used: How many of the learning rates it sets are trained with: ``stepped`` for a
            schedule stepped after every step, the epochs begun for one stepped per epoch.

    Returns:
        The learning rates the run's steps will use, or ``None`` without a schedule.

    Raises:
        CockpitError: the schedule cannot be built, fails within ``stepped`` steps, or sets a
            negative or non-finite learning rate.
    """
    schedule = config.schedule
    if schedule is None:
        return None
    scratch = build_optimizer(config, [nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(config, scratch)
    first = last = lowest = highest = learning_rates(scratch)[0]  # over the rates trained with so far
    hint = f"the run steps the schedule {stepped} times (once per {schedule.interval}): choose arguments that allow that"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of a scheduler stepped before its optimizer
        for count in range(1, stepped + 1):
            try:
                scheduler.step()
            except _TORCH_COMPLAINTS as error:
                raise config.fail("schedule", f"torch.optim.lr_scheduler.{schedule.name} fails at its step {count}: {error}", hint) from None
            now = learning_rates(scratch)
            bad = [rate for rate in now if not (math.isfinite(rate) and rate >= 0)]
            if bad:
                raise config.fail("schedule", f"torch.optim.lr_scheduler.{schedule.name} sets the learning rate to {bad[0]} at its step {count}", hint)
            if count < used:  # the rate of a step (or epoch) that trains
                last = now[0]
                lowest, highest = min(lowest, last), max(highest, last)
    return LearningRatePlan(first, last, lowest, highest)


def learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Return the current learning rate of each parameter group."""
    return [float(group["lr"]) for group in optimizer.param_groups]
