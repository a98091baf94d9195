"""Turn a validated :class:`RunConfig` into the objects a run needs: problem, optimizer, device.

Everything that can be wrong with a config beyond its structure (an unknown problem or
optimizer, a bad problem option, a batch larger than the data) is found here, before any
training starts, so ``cockpit run --dry-run`` catches it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cockpit_cli.config import RunConfig
from cockpit_cli.typed_values import check_value
from cockpit_cli.errors import did_you_mean
from cockpit_cli.instruments.quantities import Quantity
from cockpit_cli.instruments.settings import build_quantities
from cockpit_cli.training.events import names_by_reason
from cockpit_cli.training.optim import LearningRatePlan, build_optimizer, build_scheduler, hyperparameters, rehearse_schedule
from problems import PROBLEMS, Problem


@dataclass
class RunSetup:
    """Everything the training loop needs, built from a config.

    Attributes:
        config: The validated config.
        problem: The problem, its model already on ``device``.
        optimizer: The optimizer over the model's trainable parameters.
        scheduler: The learning-rate scheduler, or ``None``.
        device: Where training happens.
        batch_size: Training batch size (config or the problem's default).
        steps_per_epoch: Full batches in one pass over the training split.
        total_steps: Steps the run takes unless stopped.
        quantities: The instruments' quantities with their schedules (empty for preset none).
        learning_rates: The learning rates the schedule gives the run's steps (``None``
            without a schedule).
    """

    config: RunConfig
    problem: Problem
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    device: torch.device
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    quantities: list[Quantity]
    learning_rates: LearningRatePlan | None = None


def resolve_device(config: RunConfig) -> torch.device:
    """Return the device for ``training.device`` (``auto`` picks CUDA when present)."""
    wanted = config.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise config.fail("training.device", "cuda was asked for but no CUDA GPU is available", "use device: cpu or device: auto")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_problem_options(config: RunConfig) -> dict[str, Any]:
    """Check the problem's name and its options against the factory's signature."""
    name = config.problem.name
    if name not in PROBLEMS:
        raise config.fail("problem.name", f"problem '{name}' is unknown{did_you_mean(name, PROBLEMS)}", "`cockpit problems` lists all")
    entry = PROBLEMS[name]
    types = entry.option_types()
    checked: dict[str, Any] = {}
    for key, value in config.problem.options.items():
        if key not in types:
            known = ["name", "batch_size", "data_dir", "download", *sorted(types)]
            raise config.fail(
                f"problem.{key}",
                f"unknown key for problem '{name}'{did_you_mean(key, known)}",
                f"keys allowed: {', '.join(known)}",
            )
        checked[key] = check_value(value, types[key], config.where(f"problem.{key}"))
    return checked


def build_run(config: RunConfig) -> RunSetup:
    """Build problem, optimizer and scheduler for ``config``; seed everything first.

    Raises:
        CockpitError: anything in the config that cannot be built, with its key path.
    """
    options = check_problem_options(config)
    device = resolve_device(config)
    seed_everything(config.training.seed)
    entry = PROBLEMS[config.problem.name]
    problem = entry.factory(
        data_dir=Path(config.problem.data_dir).expanduser(),
        download=config.problem.download,
        seed=config.training.seed,
        **options,
    )
    batch_size = config.problem.batch_size or entry.info.batch_size
    if batch_size is None:
        raise config.fail("problem.batch_size", f"problem '{entry.info.name}' has no default batch size", "set problem.batch_size")
    train_size = len(problem.splits.train)
    steps_per_epoch = train_size // batch_size
    if steps_per_epoch == 0:
        raise config.fail(
            "problem.batch_size",
            f"batch size {batch_size} is larger than the {train_size} training examples",
            f"choose a batch size of at most {train_size}",
        )
    total_steps = _total_steps(config, entry.info.epochs, steps_per_epoch)
    problem.model.to(device)
    trainable = [p for p in problem.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, trainable)
    if config.schedule is not None and config.schedule.interval == "step":
        stepped = used = total_steps
    else:  # stepped at the end of every full epoch; a last, partial epoch uses one rate more
        stepped, used = total_steps // steps_per_epoch, -(-total_steps // steps_per_epoch)
    plan = rehearse_schedule(config, stepped, used)
    scheduler = build_scheduler(config, optimizer)
    quantities = build_quantities(config, total_steps)
    return RunSetup(config, problem, optimizer, scheduler, device, batch_size, steps_per_epoch, total_steps, quantities, plan)


def _total_steps(config: RunConfig, default_epochs: int | None, steps_per_epoch: int) -> int:
    training = config.training
    if training.steps is not None:
        return training.steps
    epochs = training.epochs or default_epochs
    if epochs is None:
        raise config.fail("training.epochs", f"problem '{config.problem.name}' has no default number of epochs", "set training.epochs or training.steps")
    return epochs * steps_per_epoch


def describe_setup(setup: RunSetup) -> dict[str, Any]:
    """Return the facts of a built run for printing (``--dry-run``) and the manifest."""
    return {
        "problem": setup.problem.name,
        "parameters": setup.problem.num_parameters(),
        "device": str(setup.device),
        "batch_size": setup.batch_size,
        "steps_per_epoch": setup.steps_per_epoch,
        "total_steps": setup.total_steps,
        "optimizer": describe_optimizer(setup.optimizer),
        "quantities": describe_quantities(setup.quantities),
        **({"schedule": f"{setup.config.schedule.name} once per {setup.config.schedule.interval}: lr {setup.learning_rates.describe()}"} if setup.learning_rates else {}),
        "splits": {split: len(setup.problem.splits.get(split)) for split in ("train", "train_eval", "valid", "test")},
    }


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """Return ``"SGD(lr=0.1, momentum=0.9, ...)"``: the class and the hyperparameters it uses
    (its first parameter group's; switches such as ``foreach`` left out)."""
    arguments = [f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in hyperparameters(optimizer).items()]
    return f"{type(optimizer).__name__}({', '.join(arguments)})"


def unavailable_quantities(setup: RunSetup) -> dict[str, str]:
    """The run's quantities that its model, loss or optimizer rule out, with the reasons (what
    the instruments will find when attached)."""
    if not setup.quantities:
        return {}
    from cockpit_cli.instruments.engine import unavailable_reason
    from cockpit_cli.instruments.support import check_support

    support = check_support(setup.problem.model, setup.problem.loss_function, setup.config.instruments.curvature)
    reasons = {quantity.name: unavailable_reason(quantity, support, setup.optimizer, setup.problem.model) for quantity in setup.quantities}
    return {name: reason for name, reason in reasons.items() if reason}


def not_tracked(setup: RunSetup) -> dict[str, str]:
    """``{"not tracked": "CABS, EarlyStopping: <reason>; ..."}`` for the dry run, or nothing when
    every quantity can be tracked (a run learns it from its instruments, which find it again)."""
    grouped = names_by_reason(unavailable_quantities(setup))
    return {"not tracked": "; ".join(f"{', '.join(names)}: {reason}" for reason, names in grouped.items())} if grouped else {}


def describe_quantities(quantities: list[Quantity]) -> str:
    """Return the quantities grouped by schedule: ``"every 4 steps from 0: Alpha, Loss; every step from 0: Time"``."""
    by_schedule: dict[str, list[str]] = {}
    for quantity in quantities:
        by_schedule.setdefault(quantity.schedule.describe(), []).append(quantity.name)
    return "; ".join(f"{schedule}: {', '.join(names)}" for schedule, names in by_schedule.items()) or "none"
