"""Plain records that leave the training loop, and the observer protocol that receives them.

Nothing in here imports torch: records hold floats, ints, strings and small lists only, so that
everything downstream (writer, dashboard, diagnosis) can be used and tested without a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Protocol


class RunStatus(str, Enum):
    """The life cycle of a run, as written into the manifest."""

    RUNNING = "running"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    DIVERGED = "diverged"


@dataclass
class StepRecord:
    """What happened in one optimisation step.

    Attributes:
        step: 0-based index of the step; the parameters it starts from are theta_step.
        epoch: 0-based epoch the step belongs to.
        loss: Mini-batch loss at theta_step, including the weight-decay term.
        lr: Learning rate(s) the step used, one per parameter group.
        time: Seconds since training started, at the end of the step.
        quantities: Instrument values computed at this step, by quantity name.
    """

    step: int
    epoch: int
    loss: float
    lr: list[float]
    time: float
    quantities: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dict (shallow: the quantity values are shared, not copied)."""
        return {"step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr, "time": self.time, "quantities": self.quantities}


@dataclass
class SplitMetrics:
    """Loss and accuracy on one evaluation split (accuracy ``None`` where undefined)."""

    loss: float
    accuracy: float | None
    examples: int


@dataclass
class EvalRecord:
    """An evaluation of the model on the held-out splits after ``step`` steps.

    Attributes:
        step: Number of steps completed when evaluating (0 = before training).
        epoch: Number of epochs completed.
        time: Seconds since training started.
        splits: Metrics per split name (``train_eval``, ``valid``, ``test``).
        samples: For the tracked validation samples (manifest ``samples.indices``), one
            character each: ``1`` classified correctly, ``0`` wrongly, ``?`` not evaluated;
            ``None`` without accuracy or tracking.
    """

    step: int
    epoch: int
    time: float
    splits: dict[str, SplitMetrics]
    samples: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SINGLE_PROCESS = {"world_size": 1, "backend": None}  # RunMeta.processes of a run on one process


@dataclass
class RunMeta:
    """Facts fixed at the start of a run, for the manifest and the display.

    Attributes:
        problem: Problem name.
        optimizer: Optimizer class name.
        seed: Random seed.
        device: Device string the run trains on (``"cpu"``, ``"cuda"``, ...).
        total_steps: Steps the run will take if nothing stops it.
        steps_per_epoch: Training steps in one epoch.
        batch_size: Training batch size.
        num_parameters: Trainable parameters of the model.
        versions: Package versions (python, torch, ...).
        instruments: What is tracked: parameter names and shapes, quantities with their
            schedules, and the quantities that are unavailable with the reason.
        notes: Free-form facts (e.g. split sizes).
        processes: Data-parallel training: ``{"world_size": W, "backend": ...}`` (one process:
            world size 1, backend ``None``).
    """

    problem: str
    optimizer: str
    seed: int
    device: str
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    num_parameters: int
    versions: dict[str, str] = field(default_factory=dict)
    instruments: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    processes: dict[str, Any] = field(default_factory=lambda: dict(SINGLE_PROCESS))


def names_by_reason(reasons: dict[str, str]) -> dict[str, list[str]]:
    """Group ``{quantity: reason}`` by reason: ``{reason: [quantity, ...]}``, in first-seen order
    (quantities that one obstacle stops share one line for the user)."""
    grouped: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        grouped.setdefault(reason, []).append(name)
    return grouped


def not_tracked_lines(unavailable: dict[str, str]) -> list[str]:
    """One line per reason a run cannot track some of its quantities: ``"CABS not tracked: <reason>"``."""
    return [f"{', '.join(names)} not tracked: {reason}" for reason, names in names_by_reason(unavailable).items()]


@dataclass
class RunEnd:
    """How a run ended.

    Attributes:
        status: Final status.
        steps: Steps completed.
        epochs: Epochs completed (fractional epochs are rounded down).
        message: One line for the user when the run did not complete normally.
        train_seconds: Seconds spent training (evaluation included).
        warnings: Things that went wrong without stopping the run (e.g. instruments switched off).
        instruments: What was tracked at the end, as in :class:`RunMeta` (quantities switched off
            during the run are under ``unavailable``); empty to keep the start's.
    """

    status: RunStatus
    steps: int
    epochs: int
    message: str | None = None
    train_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    instruments: dict[str, Any] = field(default_factory=dict)


class Observer(Protocol):
    """Receives the records of a run as they happen. Methods must return quickly."""

    def on_start(self, meta: RunMeta) -> None: ...

    def on_step(self, record: StepRecord) -> None: ...

    def on_eval(self, record: EvalRecord) -> None: ...

    def on_end(self, end: RunEnd) -> None: ...

    # Optional: ``on_warning(self, text: str) -> None`` receives each warning of ``RunEnd.warnings``
    # that arises during the run (a quantity switched off), when it arises.
