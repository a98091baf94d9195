"""Attach the instruments to your own PyTorch training loop, and get a run directory.

Four added lines; ``cockpit diagnose`` / ``compare`` / ``watch`` then read the result like any
run made by ``cockpit run``::

    from cockpit_cli.api import TrackedRun

    with TrackedRun("results/my-run", model, loss_fn, per_sample_loss_fn, optimizer, preset="economy") as run:
        for step, (inputs, targets) in enumerate(loader):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            run.backward(step, loss, inputs, outputs, targets)   # instead of loss.backward()
            optimizer.step()
            run.step(step, loss)                                  # after optimizer.step()

``per_sample_loss_fn(outputs, targets)`` returns the ``[N]`` per-sample losses whose mean is
``loss_fn``'s value (e.g. ``nn.CrossEntropyLoss(reduction="none")``; a loss per output element,
``[N, ...]``, as ``nn.MSELoss(reduction="none")`` gives, is averaged per sample).
"""

from __future__ import annotations

import atexit
import numbers
import operator
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cockpit_cli.config import parse_config
from cockpit_cli.errors import CockpitError
from cockpit_cli.instruments.batch_inputs import batch_size
from cockpit_cli.instruments.engine import Instruments
from cockpit_cli.instruments.loss_scale import LossScale
from cockpit_cli.instruments.settings import build_quantities
from cockpit_cli.instruments.sync import joined_process_group
from cockpit_cli.instruments.tracker import Tracker
from cockpit_cli.storage import schema
from cockpit_cli.storage.writer import DirectoryAdvice, RunWriter, prepare_run_directory
from cockpit_cli.training.events import SINGLE_PROCESS, EvalRecord, RunEnd, RunMeta, RunStatus, SplitMetrics, StepRecord
from cockpit_cli.training.optim import hyperparameters, learning_rates
from cockpit_cli.versions import package_versions


UNCLOSED = "the process ended before the run was closed; close it with run.close(), or train inside a with block, which closes it"
_open_runs: weakref.WeakSet[TrackedRun] = weakref.WeakSet()  # closed at the interpreter's exit where the loop did not


@atexit.register
def _close_open_runs() -> None:
    """Close the runs a script left open (no ``with`` block, no ``run.close()``): their records
    still waiting for a later step are written, and the manifest says how the run ended."""
    for run in list(_open_runs):
        try:
            run.close(RunStatus.INTERRUPTED, UNCLOSED)
        except Exception:  # noqa: BLE001 - the interpreter is ending; the others still get closed
            pass


API_ADVICE = DirectoryAdvice(
    parent="give TrackedRun a run_dir in a writable directory",
    name="give TrackedRun another run_dir",
    overwrite="pass overwrite=True to TrackedRun to replace it, or give another run_dir",
    held_here="close the TrackedRun that writes it first: run.close(), or train inside a with block, which closes it",
)


def _check_arguments(model: Any, loss_function: Any, per_sample_loss_function: Any, optimizer: Any, total_steps: Any, weight_decay: Any) -> None:
    """Raise :class:`CockpitError` for an argument of :class:`TrackedRun` of the wrong kind."""

    def wrong(name: str, value: Any, expected: str, hint: str) -> CockpitError:
        return CockpitError(f"TrackedRun: {name}: a {type(value).__name__}, not {expected}", hint)

    if not isinstance(model, nn.Module):
        raise wrong("model", model, "a torch.nn.Module", "pass the network your loop trains")
    if not any(p.requires_grad for p in model.parameters()):
        raise CockpitError("TrackedRun: model: no parameter requires gradients", "attach the instruments to a network your loop trains")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise wrong("optimizer", optimizer, "a torch.optim.Optimizer", "pass the optimizer that updates the model")
    for name, function in (("loss_function", loss_function), ("per_sample_loss_function", per_sample_loss_function)):
        if not callable(function):
            raise wrong(name, function, "a function of (outputs, targets)", "pass a loss module, e.g. nn.CrossEntropyLoss() and nn.CrossEntropyLoss(reduction='none')")
    if total_steps is not None and (not isinstance(total_steps, numbers.Integral) or isinstance(total_steps, bool) or total_steps < 1):
        raise CockpitError(f"TrackedRun: total_steps: expected a whole number >= 1, got {total_steps!r}", "pass the number of steps your loop takes, or leave it out")
    if not isinstance(weight_decay, numbers.Real) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise CockpitError(f"TrackedRun: weight_decay: expected a number >= 0, got {weight_decay!r}", "pass the factor lambda of the 0.5 * lambda * ||w||^2 term your loss adds, or leave it out")


def _whole_number(name: str, value: Any) -> int:
    """Return ``value`` as a Python int (numpy's and torch's integers too), or raise ``TypeError``."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: a {type(value).__name__}; give a whole number (the loop's count)") from None


def _split_metrics(name: str, value: Any) -> SplitMetrics:
    """Return a split's ``(loss, accuracy)``, or its loss alone, as :class:`SplitMetrics`, or raise
    ``ValueError`` for an accuracy that is no fraction (a percentage, say)."""
    loss, accuracy = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value, None)
    try:
        loss, accuracy = float(loss), None if accuracy is None else float(accuracy)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r}; give (loss, accuracy), (loss, None) or the loss alone, as numbers") from None
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"{name}: accuracy {accuracy:g} is no fraction in [0, 1]; give {accuracy / 100:g} for {accuracy:g}%" if 1.0 < accuracy <= 100.0 else f"{name}: accuracy {accuracy:g} is no fraction in [0, 1]")
    return SplitMetrics(loss, accuracy, 0)


class TrackedRun:
    """A training run of your own loop, instrumented and recorded.

    Args:
        run_dir: The run directory to create (its parent is created if needed).
        model: The network.
        loss_function: Mean-reduced loss used for training.
        per_sample_loss_function: ``(outputs, targets) -> [N]`` per-sample losses.
        optimizer: The optimizer.
        preset: ``none``, ``economy``, ``business`` or ``full``.
        every: Track the preset's quantities every ``every`` steps.
        quantities: Per-quantity additions and overrides, as under ``instruments.quantities``
            in a config (e.g. ``{"HessMaxEV": {"every": 10}, "TICDiag": False}``).
        total_steps: Planned number of steps (shown in the dashboard; needed for log spacing).
        weight_decay: L2 factor of a ``0.5 * lambda * ||w||^2`` term your loss includes.
        decayed_parameters: The parameters that term applies to.
        curvature: ``hessian``, ``ggn`` or ``ggn_mc`` for HessTrace and TIC.
        overwrite: Replace an existing run directory.
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: nn.Module,
        loss_function: Any,
        per_sample_loss_function: Any,
        optimizer: torch.optim.Optimizer,
        *,
        preset: str = "economy",
        every: int = 1,
        quantities: dict[str, Any] | None = None,
        total_steps: int | None = None,
        weight_decay: float = 0.0,
        decayed_parameters: Iterable[nn.Parameter] = (),
        curvature: str = "hessian",
        overwrite: bool = False,
    ):
        _check_arguments(model, loss_function, per_sample_loss_function, optimizer, total_steps, weight_decay)
        total_steps, weight_decay = None if total_steps is None else int(total_steps), float(weight_decay)  # numpy's numbers too
        settings = {"preset": preset, "every": every, "curvature": curvature, "quantities": quantities or {}}
        optimizer_section = {"name": type(optimizer).__name__, **hyperparameters(optimizer)}  # what compare and diagnose read
        config = parse_config({"instruments": settings, "optimizer": optimizer_section, "problem": {"name": schema.API_PROBLEM}}, source="TrackedRun")
        due = build_quantities(config, total_steps or 0)
        log_spaced = [quantity.name for quantity in due if quantity.schedule.spacing == "log"]
        if log_spaced and not total_steps:
            raise CockpitError(f"TrackedRun: {', '.join(log_spaced)} spread over the run in log spacing, whose length is not given", "pass total_steps=N, the number of steps your loop takes")
        self.sync = joined_process_group()  # data-parallel processes combine their shards' sums
        instruments = Instruments(
            model, loss_function, per_sample_loss_function, optimizer, due,
            weight_decay=weight_decay, decayed_parameters=decayed_parameters, curvature=curvature, sync=self.sync,
        )
        self.run_dir = Path(run_dir)
        self.writer: RunWriter | None = None  # process 0 writes the run directory, the others none
        self._create_directory(config, overwrite)
        self.tracker = Tracker(instruments, self._on_step)
        self.optimizer = optimizer
        self.epoch = 0
        self.steps = 0
        self._offset = 0  # added to the loop's step numbers since they last started again
        self._last_step: int | None = None  # the loop's number of the last step seen
        self._last_backward: int | None = None  # the run's number of the last step run.backward saw
        self._last_recorded: int | None = None  # ... and of the last step run.step recorded
        self._loop_warnings: dict[str, str] = {}  # the loop's slips by kind, each said once
        self.started = time.perf_counter()
        self.closed = False
        # The sizes of the first step's backward passes (several where gradients accumulate over
        # micro-batches): the run's batch size, learnt by the end of that step.
        self._first_step: int | None = None
        self._first_batches: list[int] | None = []
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        device = str(next(model.parameters()).device)
        processes = {"world_size": self.sync.world_size, "backend": dist.get_backend()} if self.sync.world_size > 1 else SINGLE_PROCESS
        meta = RunMeta(schema.API_PROBLEM, type(optimizer).__name__, 0, device, total_steps or 0, 0, 0, trainable, package_versions(), self.tracker.describe(), processes=dict(processes))
        if self.writer is not None:
            self.writer.on_start(meta)
        _open_runs.add(self)

    def _create_directory(self, config: Any, overwrite: bool) -> None:
        """Create the run directory in process 0; every process raises where it could not."""
        failure = None
        if self.sync.rank == 0:
            try:
                self.run_dir = prepare_run_directory(self.run_dir.parent, self.run_dir.name, overwrite=overwrite, advice=API_ADVICE)
                self.writer = RunWriter(self.run_dir, config.to_dict(), config.to_yaml())
            except CockpitError as error:
                failure = error
        if self.sync.world_size > 1:
            failed = float(self.sync.maximum(torch.tensor([float(failure is not None)], device=self.sync.device))) > 0
            if failed and failure is None:
                raise CockpitError(f"TrackedRun: process 0 could not create {self.run_dir} (its error says why)")
        if failure is not None:
            raise failure

    def _on_step(self, record: StepRecord) -> None:
        if self.writer is not None:
            self.writer.on_step(record)

    def _run_step(self, step: int) -> int:
        """The run's number of the loop's ``step``: the loop's own while its numbers grow (gaps
        kept); where they start again (from 0 in every epoch), the count goes on from the last."""
        step = _whole_number("step", step)
        if self._last_step is not None and step < self._last_step:
            self._offset = self._last_step + self._offset + 1 - step
        self._last_step = step
        return step + self._offset

    def backward(self, step: int, loss: Tensor, inputs: Tensor | tuple[Tensor, ...], outputs: Any, targets: Any, scale: LossScale = 1.0) -> None:
        """Use instead of ``(scale * loss).backward()``: gradients plus every quantity due at ``step``.

        ``scale`` (``1 / k`` for gradients accumulated over ``k`` micro-batches, or the
        ``torch.amp.GradScaler`` of mixed-precision training, for ``scaler.scale(loss).backward()``)
        scales the gradient added to the parameters' while the quantities describe ``loss`` itself."""
        run_step = self._run_step(step)
        self.tracker.backward(run_step, loss, inputs, outputs, targets, scale)
        self._last_backward = run_step
        if self._first_batches is not None:
            self._first_step = run_step if self._first_step is None else self._first_step
            if run_step == self._first_step:
                self._first_batches.append(batch_size(inputs) * self.sync.world_size)  # the global batch's
                if len(self._first_batches) == 1 and self.writer is not None:  # known before the step ends, should the loop fail
                    self.writer.on_batch_size(self._first_batches[0])

    def step(self, step: int, loss: Tensor | float, epoch: int | None = None) -> None:
        """Call after ``optimizer.step()`` of ``step`` to record it."""
        if epoch is not None:
            self.epoch = _whole_number("epoch", epoch)
        step = self._run_step(step)
        if step == self._last_recorded:
            self._warn_once("repeated", f"run.step was called again for step {step}; the second call is ignored (call it once per step, after optimizer.step())")
            return
        without_backward = self._last_backward != step
        if without_backward and self.tracker.instruments is not None and self.tracker.instruments.quantities:
            self._warn_once(
                "no backward",
                f"run.step recorded step {step} without run.backward for it, so no quantity was computed there; "
                "call run.backward(step, loss, inputs, outputs, targets) in place of loss.backward()"
            )
        self._last_recorded = step
        if self._first_batches:
            micro_batches, self._first_batches = self._first_batches, None
            if len(micro_batches) > 1 and self.writer is not None:  # gradients accumulated over micro-batches
                self.writer.on_batch_size(sum(micro_batches), micro_batch_size=micro_batches[0], micro_batches=len(micro_batches))
        value = self.sync.mean(float(loss.detach()) if isinstance(loss, Tensor) else float(loss))  # the global batch's
        record = StepRecord(step, self.epoch, value, learning_rates(self.optimizer), time.perf_counter() - self.started)
        if without_backward:  # the instruments saw no pass of it: the steps before keep their values
            self.tracker.skip(step, record)
        else:
            self.tracker.after_update(step, record)
        self.steps = step + 1
        for text in self.tracker.new_warnings():  # into the manifest when it arises (a quantity switched off)
            if self.writer is not None:
                self.writer.on_warning(text)

    def evaluate(self, step: int, **splits: Any) -> None:
        """Record an evaluation: ``run.evaluate(step, valid=(loss, accuracy), test=(loss, None))``;
        a split's loss alone (``test=loss``) has no accuracy. Accuracies are fractions in [0, 1]."""
        metrics = {name: _split_metrics(name, value) for name, value in splits.items()}
        step = _whole_number("step", step) + self._offset  # numbered as the steps are (an epoch's end: its last step + 1)
        if self.writer is not None:
            self.writer.on_eval(EvalRecord(step, self.epoch, time.perf_counter() - self.started, metrics))

    def close(self, status: RunStatus | str = RunStatus.COMPLETED, message: str | None = None) -> None:
        """Flush everything and mark the run ended (done by the ``with`` block).

        Args:
            status: How it ended: a :class:`RunStatus` or its value (``"completed"``, ``"failed"``, ...).
            message: Why it ended so (for a failure, say).
        """
        ended = [s.value for s in RunStatus if s is not RunStatus.RUNNING]
        if status not in ended:
            raise ValueError(f"status: {status!r}; give one of {', '.join(map(repr, ended))}")
        status = RunStatus(status)
        if self.closed:
            return
        self.closed = True
        _open_runs.discard(self)
        if status is RunStatus.COMPLETED and self._last_backward is not None and (self._last_recorded is None or self._last_backward > self._last_recorded):
            self._warn_once(
                "unrecorded",
                f"run.backward saw step {self._last_backward}, but run.step did not record it{'' if self._last_recorded is not None else ' (nor any step)'}; "
                "call run.step(step, loss) after optimizer.step() to record each step"
            )
        self.tracker.flush()
        said = self.tracker.warnings() + list(self._loop_warnings.values())
        if self.writer is not None:
            self.writer.on_end(RunEnd(status, self.steps, self.epoch, message, time.perf_counter() - self.started, said, self.tracker.describe()))

    def _warn_once(self, kind: str, text: str) -> None:
        """Say a slip of the loop of ``kind`` once: a Python warning now, and in the run's warnings."""
        if kind in self._loop_warnings:
            return
        self._loop_warnings[kind] = text
        warnings.warn(text, stacklevel=3)
        if self.writer is not None:
            self.writer.on_warning(text)

    def __enter__(self) -> "TrackedRun":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        if kind is None:
            self.close()
        elif issubclass(kind, KeyboardInterrupt):
            self.close(RunStatus.INTERRUPTED, "interrupted by the user")
        else:
            self.close(RunStatus.FAILED, f"{kind.__name__}: {error}")
