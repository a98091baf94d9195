"""The training loop: plain PyTorch, readable top to bottom.

Every step: forward, loss (data loss plus the weight-decay term), backward (through the
instruments, which compute whatever quantities are due in the same pass), optimizer step, and a
:class:`StepRecord` handed to the observers. A quantity whose value needs the next step (Alpha)
delays the record of its step by one step. Evaluations on train_eval / valid / test
happen before the first step, at the configured interval, and after the last step, as DeepOBS
does. A non-finite loss ends the run as ``diverged``; Ctrl-C ends it as ``interrupted``; both
keep everything recorded so far.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cockpit_cli.errors import CockpitError, OutputClosed, PeerStopped
from cockpit_cli.instruments import Instruments
from cockpit_cli.instruments.sync import is_collective_failure
from cockpit_cli.instruments.tracker import Tracker
from cockpit_cli.launch import StopAfterStep
from cockpit_cli.training.build import RunSetup, describe_setup
from cockpit_cli.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from cockpit_cli.training.distributed import Processes
from cockpit_cli.training.events import SINGLE_PROCESS, EvalRecord, Observer, RunEnd, RunMeta, RunStatus, SplitMetrics, StepRecord
from cockpit_cli.training.optim import learning_rates
from cockpit_cli.versions import package_versions

EVAL_SPLITS = ("train_eval", "valid", "test")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> DataLoader:
    """Return a single-process loader; with ``shuffle`` its order depends on ``seed`` only."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator, num_workers=0)


def gradients_are_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient ``optimizer`` would apply is finite (one pass over them, one sync).

    The data-parallel processes hold the same averaged gradients, so they agree.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(grad).all() for grad in grads]).all())


class Trainer:
    """Trains ``setup`` and reports to ``observers``.

    Args:
        setup: Problem, optimizer, scheduler and device, built from the config.
        observers: Receive the records in order (writer first, so nothing is lost).
        run_dir: Where checkpoints go (none without one).
        processes: This process's part in data-parallel training (``None``: one process). Each
            process trains on its shard of every batch; only rank 0 evaluates and checkpoints.
    """

    def __init__(self, setup: RunSetup, observers: list[Observer], run_dir: Path | None = None, processes: Processes | None = None):
        self.setup = setup
        self.processes = processes
        self.is_main = processes is None or processes.is_main
        self.observers = observers
        self.run_dir = run_dir  # where checkpoints go (none without one)
        self.epoch_order: torch.Tensor | None = None
        self.batches_in_epoch = 0
        self.problem = setup.problem
        self.model = setup.problem.model
        self.training = setup.config.training
        self.step = 0
        self.epoch = 0
        self.last_eval_step: int | None = None
        self.started = time.perf_counter()
        instruments = None
        if setup.quantities:
            problem = setup.problem
            instruments = Instruments(
                problem.model,
                problem.loss_function,
                problem.per_sample_loss_function,
                setup.optimizer,
                setup.quantities,
                weight_decay=problem.weight_decay,
                decayed_parameters=problem.decayed_parameters,
                curvature=setup.config.instruments.curvature,
                sync=processes.sync if processes else None,
            )
        self.train_model = processes.wrap(self.model, setup.device) if processes else self.model
        self.tracker = Tracker(instruments, lambda record: self._notify("on_step", record), self.train_model)
        self.sample_indices = self._choose_tracked_samples()
        self.nonfinite_steps = 0
        self._sample_hits: str | None = None

    # -- the loop --------------------------------------------------------------------------

    def run(self, resume: dict | None = None) -> RunEnd:
        """Train to the end (or until divergence / Ctrl-C) and return how the run ended.

        Args:
            resume: A checkpoint (see :mod:`checkpoint`) to continue from, or ``None``.
        """
        self._notify("on_start", self._meta())
        self.started = time.perf_counter()
        train_loader = make_loader(self.problem.splits.train, self.setup.batch_size, shuffle=True, seed=self.training.seed, drop_last=True)
        stop = StopAfterStep() if self.processes is None else None  # data-parallel processes note their launcher's signals
        try:
            with stop or contextlib.nullcontext():
                return self._train(resume, train_loader, stop)
        except KeyboardInterrupt:
            return self._end(RunStatus.INTERRUPTED, f"interrupted by the user after {self.step} steps")
        except BaseException as error:
            if self.processes is not None and is_collective_failure(error):
                self.processes.signals.settle()
                if self.processes.signals.interrupted:
                    return self._end(RunStatus.INTERRUPTED, f"interrupted by the user after {self.step} steps")
                error = PeerStopped(self.processes.rank, self.processes.world_size, self.step)
            self._end(RunStatus.FAILED, error.message if isinstance(error, (CockpitError, OutputClosed)) else f"{type(error).__name__}: {error}")
            if isinstance(error, PeerStopped):
                raise error from None
            raise

    def _train(self, resume: dict | None, train_loader: DataLoader, stop: StopAfterStep | None) -> RunEnd:
        """The training of :meth:`run`; Ctrl-C noted by ``stop`` ends it between steps."""
        skip = self._restore(resume, train_loader.generator) if resume else 0
        if resume is None:
            self.evaluate()
        while self.step < self.setup.total_steps:
            self.epoch_order = train_loader.generator.get_state()  # the sampler draws this epoch's order from it
            self.batches_in_epoch = 0
            for inputs, targets in train_loader:
                if skip:  # resuming mid-epoch: these batches were trained on before the checkpoint
                    skip -= 1
                    self.batches_in_epoch += 1
                    continue
                if self.step >= self.setup.total_steps:
                    break
                diverged = self.train_step(inputs, targets)
                self.batches_in_epoch += 1
                if diverged:
                    return self._end(RunStatus.DIVERGED, diverged)
                if self._eval_due_after_step():
                    self.evaluate()
                self._checkpoint_if_due()
                if stop is not None and stop.requested:
                    raise KeyboardInterrupt
            else:
                self.end_epoch()
        self.tracker.flush()  # the last step's record first, then the final evaluation
        if self.last_eval_step != self.step:
            self.evaluate()
        return self._end(RunStatus.COMPLETED)

    # -- checkpoints -----------------------------------------------------------------------

    def _checkpoint_if_due(self) -> None:
        every = self.training.checkpoint_every
        if every is not None and self.run_dir is not None and self.is_main and self.step % every == 0:
            save_checkpoint(self.run_dir, self.checkpoint_state())

    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly from here (after a step and its evaluation)."""
        scheduler = self.setup.scheduler
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "epoch_order": self.epoch_order,
            "last_eval_step": self.last_eval_step,
            "elapsed": self._elapsed(),
            "nonfinite_steps": self.nonfinite_steps,
            "model": self.model.state_dict(),
            "optimizer": self.setup.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(self.setup.device),
            "tracker": self.tracker.state_dict(),
        }

    def _restore(self, state: dict, generator: torch.Generator) -> int:
        """Load a checkpoint; return how many batches of the current epoch to skip."""
        self.model.load_state_dict(state["model"])
        self.setup.optimizer.load_state_dict(state["optimizer"])
        if self.setup.scheduler is not None and state["scheduler"] is not None:
            self.setup.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.last_eval_step = state["step"], state["epoch"], state["last_eval_step"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.started -= state["elapsed"]
        self.tracker.load_state_dict(state["tracker"])
        generator.set_state(state["epoch_order"])
        set_rng_state(state["rng"], self.setup.device)
        return state["batches_in_epoch"]

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        """Take one optimisation step; return a message if the loss was not finite.

        Args:
            inputs: A training batch ``[N, ...]``.
            targets: Its targets ``[N, ...]``.
        """
        device = self.setup.device
        if self.processes is not None:
            inputs, targets = self.processes.shard(inputs), self.processes.shard(targets)
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer = self.setup.optimizer
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        outputs = self.train_model(inputs)
        loss = self.problem.loss_function(outputs, targets) + self.problem.regularization_loss()
        loss_value = float(loss.item())
        if self.processes is not None:
            loss_value = self._agree(loss_value)
        rates = learning_rates(optimizer)
        if not math.isfinite(loss_value):
            self.nonfinite_steps += 1
            if self.training.on_nonfinite == "stop":
                self.tracker.flush()
                self._notify("on_step", StepRecord(self.step, self.epoch, loss_value, rates, self._elapsed()))
                return (
                    f"the loss became {loss_value} at step {self.step} (epoch {self.epoch}); "
                    "the learning rate is probably too large for this problem (training.on_nonfinite: skip drops such steps instead)"
                )
            if self.training.on_nonfinite == "skip":
                self.tracker.skip(self.step, StepRecord(self.step, self.epoch, loss_value, rates, self._elapsed()))
                with warnings.catch_warnings():  # torch warns when the first steps are skipped: the schedule moves on without them, as meant
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
                    self._step_schedule()
                self.step += 1
                return None
        self.tracker.backward(self.step, loss, inputs, outputs, targets)
        if self.training.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.training.clip_grad_norm)
        if self.training.on_nonfinite == "skip" and not gradients_are_finite(optimizer):
            self.nonfinite_steps += 1  # a finite loss whose gradient overflowed: its update would make the parameters NaN
        else:
            optimizer.step()
        self.tracker.after_update(self.step, StepRecord(self.step, self.epoch, loss_value, rates, self._elapsed()))
        self._report_warnings()
        self._step_schedule()
        self.step += 1
        return None

    def _step_schedule(self) -> None:
        if self.setup.scheduler is not None and self.setup.config.schedule.interval == "step":
            self.setup.scheduler.step()

    def end_epoch(self) -> None:
        """Count a finished epoch, step a per-epoch schedule, evaluate if due."""
        self.epoch += 1
        if self.setup.scheduler is not None and self.setup.config.schedule.interval == "epoch":
            self.setup.scheduler.step()
        if self.step >= self.setup.total_steps:
            self.tracker.flush()  # training is over: the last step's record before the final evaluation
        every = self.training.eval_every_epochs
        if every is not None and self.epoch % every == 0 and self.last_eval_step != self.step:
            self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> EvalRecord | None:
        """Evaluate loss (with the weight-decay term) and accuracy on the held-out splits
        (rank 0 alone in data-parallel training: the others return ``None``)."""
        if not self.is_main:
            self.last_eval_step = self.step
            return None
        self.model.eval()
        regularization = float(self.problem.regularization_loss().item())
        self._sample_hits = None
        metrics = {split: self._evaluate_split(split, regularization) for split in EVAL_SPLITS}
        self.model.train()
        record = EvalRecord(self.step, self.epoch, self._elapsed(), metrics, self._sample_hits)
        self.last_eval_step = self.step
        self._notify("on_eval", record)
        return record

    def _evaluate_split(self, split: str, regularization: float) -> SplitMetrics:
        loader = make_loader(self.problem.splits.get(split), self.setup.batch_size, shuffle=False, seed=0, drop_last=False)
        total_loss, correct, examples = 0.0, 0, 0
        hits: list[torch.Tensor] = []
        for index, (inputs, targets) in enumerate(loader):
            if self.training.eval_max_batches is not None and index >= self.training.eval_max_batches:
                break
            inputs, targets = inputs.to(self.setup.device), targets.to(self.setup.device)
            outputs = self.model(inputs)
            batch = len(inputs)
            total_loss += float(self.problem.loss_function(outputs, targets).item()) * batch
            mask = self.problem.correct_mask(outputs, targets)
            if mask is not None:
                correct += int(mask.sum())
                hits.append(mask.cpu())
            examples += batch
        if split == "valid" and self.sample_indices and hits:
            self._sample_hits = self._tracked_outcomes(torch.cat(hits))
        if examples == 0:
            return SplitMetrics(loss=float("nan"), accuracy=None, examples=0)
        accuracy = correct / examples if self.problem.info.has_accuracy else None
        return SplitMetrics(loss=total_loss / examples + regularization, accuracy=accuracy, examples=examples)

    # -- per-sample outcomes (which validation samples are learned, and when) --------------

    def _choose_tracked_samples(self) -> list[int]:
        """Pick a fixed, seeded subset of validation positions whose outcomes are recorded."""
        size = min(self.training.track_samples, len(self.problem.splits.valid))
        if not self.problem.info.has_accuracy or size == 0:
            return []
        generator = torch.Generator().manual_seed(self.training.seed + 2)
        return sorted(torch.randperm(len(self.problem.splits.valid), generator=generator)[:size].tolist())

    def _tracked_outcomes(self, hits: torch.Tensor) -> str:
        """Return ``1`` / ``0`` / ``?`` per tracked sample from the valid split's ``[M]`` hits."""
        return "".join("?" if i >= len(hits) else ("1" if hits[i] else "0") for i in self.sample_indices)

    # -- helpers ---------------------------------------------------------------------------

    def _eval_due_after_step(self) -> bool:
        every = self.training.eval_every_steps
        return every is not None and self.step % every == 0

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _meta(self) -> RunMeta:
        facts = describe_setup(self.setup)
        return RunMeta(
            problem=self.problem.name,
            optimizer=type(self.setup.optimizer).__name__,
            seed=self.training.seed,
            device=facts["device"],
            total_steps=self.setup.total_steps,
            steps_per_epoch=self.setup.steps_per_epoch,
            batch_size=self.setup.batch_size,
            num_parameters=facts["parameters"],
            versions=package_versions(),
            instruments=self.tracker.describe(),
            processes=self.processes.describe() if self.processes else dict(SINGLE_PROCESS),
            notes={"splits": facts["splits"], "samples": {"split": "valid", "indices": self.sample_indices}},
        )

    def _agree(self, loss_value: float) -> float:
        """Data-parallel training: the global mean loss, and stop (before this step's update) if
        any process's launcher asked it to: Ctrl-C, or another process failed."""
        loss_value, interrupted, peer_stopped = self.processes.agree(loss_value)
        if interrupted:
            raise KeyboardInterrupt
        if peer_stopped:
            raise PeerStopped(self.processes.rank, self.processes.world_size, self.step)
        return loss_value

    def _end(self, status: RunStatus, message: str | None = None) -> RunEnd:
        self.tracker.flush()
        warnings = self.tracker.warnings()
        if self.nonfinite_steps and self.training.on_nonfinite != "stop":
            action = "skipped" if self.training.on_nonfinite == "skip" else "taken anyway"
            what = "loss or gradient" if self.training.on_nonfinite == "skip" else "loss"
            warnings.append(f"{self.nonfinite_steps} steps had a non-finite {what} and were {action} (training.on_nonfinite: {self.training.on_nonfinite})")
        end = RunEnd(status, self.step, self.epoch, message, self._elapsed(), warnings, self.tracker.describe())
        self._notify("on_end", end)
        return end

    def _report_warnings(self) -> None:
        """Hand the observers that take them each new warning of the tracker (a quantity switched
        off during the run), so that it is seen, and written, when it happens."""
        for text in self.tracker.new_warnings():
            for observer in self.observers:
                handler = getattr(observer, "on_warning", None)
                if handler is not None:
                    handler(text)

    def _notify(self, method: str, payload: object) -> None:
        for observer in self.observers:
            getattr(observer, method)(payload)


def train(setup: RunSetup, observers: list[Observer], run_dir: Path | None = None, resume: dict | None = None, processes: Processes | None = None) -> RunEnd:
    """Train ``setup`` to the end, reporting to ``observers``; return how the run ended.

    Args:
        setup: What to train.
        observers: Receive the records.
        run_dir: Where checkpoints are written (``training.checkpoint_every``).
        resume: A checkpoint to continue from.
        processes: This process's part in data-parallel training, or ``None``.
    """
    return Trainer(setup, observers, run_dir, processes).run(resume)
