"""``cockpit run --nproc N``: start the run's processes through ``torch.distributed.run``.

The command hands itself to PyTorch's launcher (the engine behind ``torchrun``), which starts
``N`` copies of ``python -m cockpit_cli run ...`` on this machine with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; ``torchrun --nproc-per-node N -m cockpit_cli run CONFIG``
does the same by hand, and multi-node launches work as torchrun's do. The launcher passes
Ctrl-C on to the processes and ends them all when one fails. Afterwards this module turns the
outcome into an exit code: rank 0 prints the run's own messages, a failing process its error,
and the launcher adds a line only for a process that died without a word (killed by a signal).
Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable, ParamSpec, TypeVar

from rich.console import Console

from cockpit_cli.config import RunConfig
from cockpit_cli.errors import CockpitError, ExitCode, PeerStopped

P = ParamSpec("P")
R = TypeVar("R")

# How long a process whose peer vanished waits for the launcher's signal that says why.
SETTLE_SECONDS = 0.5
# The environment variable through which the launcher tells its processes the user's command line.
COMMAND_VARIABLE = "COCKPIT_LAUNCH_COMMAND"


def use_huge_pages() -> None:
    """Back torch's large CPU tensors with transparent huge pages (unless the user chose otherwise).

    The instruments' per-sample gradients and curvature factors are tensors of hundreds of MiB
    that live for a moment; with 4 KiB pages most of their cost is the kernel faulting their pages
    in (a fresh 256 MiB tensor: about 50 ms to zero, 17 ms with huge pages). torch reads
    ``THP_MEM_ALLOC_ENABLE`` once, before its first allocation, so this runs before torch is
    imported; data-parallel processes inherit it.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def environment_world() -> tuple[int, int, int] | None:
    """Return ``(rank, world_size, local_rank)`` when started as one of several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return None
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def ending_with_peers(run: Callable[P, R]) -> Callable[P, R]:
    """Decorate a process's run so that a failed collective (a peer process is gone, whatever this
    process was doing) ends it as :class:`PeerStopped` instead of a low-level error."""

    @functools.wraps(run)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return run(*args, **kwargs)
        except Exception as error:
            world = environment_world()
            if world is None or isinstance(error, CockpitError):
                raise
            from cockpit_cli.instruments.sync import is_collective_failure

            if not is_collective_failure(error):
                raise
            raise PeerStopped(world[0], world[1], None) from None

    return guarded


def process_label() -> str:
    """``"process r of W: "`` in a process other than rank 0, else ``""`` (prefixes its errors)."""
    world = environment_world()
    return "" if world is None or world[0] == 0 else f"process {world[0]} of {world[1]}: "


def user_command() -> list[str]:
    """The command line the user typed: the launcher's own for a process it started, else this one's."""
    launched = os.environ.get(COMMAND_VARIABLE)
    return json.loads(launched) if launched else list(sys.argv)


def check_shards(config: RunConfig, batch_size: int | None, world_size: int) -> None:
    """Raise a config error unless every batch splits into ``world_size`` equal shards
    (``batch_size`` ``None``: the problem's default)."""
    if batch_size is None:
        from problems import PROBLEMS

        entry = PROBLEMS.get(config.problem.name)
        batch_size = entry.info.batch_size if entry is not None else None
    if world_size > 1 and batch_size and batch_size % world_size:
        raise config.fail(
            "distributed.nproc",
            f"a batch of {batch_size} samples does not split into {world_size} equal shards",
            f"choose a number of processes that divides {batch_size}, or set problem.batch_size to a multiple of {world_size}",
        )


class StopSignals:
    """Requests to stop from the launcher, noted by a process of a data-parallel run.

    ``torch.distributed.run`` passes Ctrl-C on to every process as SIGINT, and ends the other
    processes with SIGTERM when one fails. Raising inside a collective would leave the run
    half-written, so both only set a flag that the training loop reads between steps; before and
    after training they let the process finish what it does (rank 0's config errors, figures;
    the launcher kills a process 30 s after SIGTERM). A process blocked in a collective whose
    peer has gone gets an error instead, and waits a moment (:meth:`settle`) for the signal that
    says why.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self.peer_stopped = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupted = True
        else:
            self.peer_stopped = True

    def install(self) -> "StopSignals":
        """Note SIGINT and SIGTERM from now on (for the rest of the process)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._note)
        return self

    def settle(self) -> None:
        """Give a signal sent together with a peer's exit a moment to arrive."""
        time.sleep(SETTLE_SECONDS)


class StopAfterStep:
    """Ctrl-C while one process trains: the first SIGINT only asks the training loop to stop after
    the current step, a second one stops at once.

    An exception raised wherever the signal lands can be lost, for instance in a finalizer that
    runs at that moment, and leave the run going; the loop instead raises ``KeyboardInterrupt``
    itself, between steps, where the run is closed cleanly as interrupted. Outside the ``with``
    block (and outside the main thread, where no handler can be set) SIGINT acts as before.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable | int | None = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def __enter__(self) -> "StopAfterStep":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


_worker_signals: StopSignals | None = None


def worker_signals() -> StopSignals:
    """This worker's stop signals, installed on the first call (as early as possible)."""
    global _worker_signals
    if _worker_signals is None:
        _worker_signals = StopSignals().install()
    return _worker_signals


def launch_processes(worker_arguments: list[str], nproc: int, run_dir: Path, errors: Console) -> ExitCode:
    """Run ``cockpit run`` on ``nproc`` local processes and wait for them.

    Args:
        worker_arguments: The arguments after ``cockpit`` for every process (``run ...``).
        nproc: Number of processes.
        run_dir: The run directory rank 0 writes (closed here if its writer was killed).
        errors: Where the launcher's own lines go.

    Returns:
        Rank 0's exit code (or FAILURE when another process failed, INTERRUPTED on Ctrl-C).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from cockpit_cli.training.events import RunStatus

    # Split the cores between the processes (torchrun would otherwise warn and pick 1).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    _quiet_launcher_logs()
    # SIGTERM to the command means what Ctrl-C means (as for one process): the launcher passes
    # SIGINT on to the processes. Its own SIGTERM tells them that another process failed.
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    os.environ[COMMAND_VARIABLE] = json.dumps(user_command())  # the run records what the user typed, not its own
    arguments = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", "--module", "cockpit_cli", *worker_arguments]
    )
    try:
        run(arguments)
    except SignalException as stop:
        _close_abandoned(run_dir, RunStatus.INTERRUPTED, "interrupted by the user")
        return ExitCode.INTERRUPTED if stop.sigval == signal.SIGINT else ExitCode.FAILURE
    except ChildFailedError as failed:
        return _report_failure(failed.failures, nproc, run_dir, errors)
    return ExitCode.OK


def _quiet_launcher_logs() -> None:
    """Silence the launcher's own log lines (each module's logger has its level set)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _report_failure(failures: dict, nproc: int, run_dir: Path, errors: Console) -> ExitCode:
    """Say which process died silently, close the run directory, and pick the exit code."""
    from cockpit_cli.training.events import RunStatus

    for rank, failure in sorted(failures.items()):
        if failure.exitcode < 0 and -failure.exitcode != signal.SIGTERM:  # died without a word; SIGTERM is the launcher's own
            errors.print(f"[bold red]error:[/] process {rank} of {nproc} was killed by {failure.signal_name()}", markup=True, highlight=False)
            hint = (
                "a process killed by the system often ran out of memory; try fewer processes or a smaller batch"
                if -failure.exitcode == signal.SIGKILL
                else "it crashed in native code; the records up to then are kept in the run directory"
            )
            errors.print(f"[dim]hint:[/] {hint}", markup=True)
    first = min(failures)
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    if codes.get(0) == ExitCode.INTERRUPTED:
        _close_abandoned(run_dir, RunStatus.INTERRUPTED, "interrupted by the user")
        return ExitCode.INTERRUPTED
    _close_abandoned(run_dir, RunStatus.FAILED, f"process {first} of {nproc} failed (exit code {codes[first]})")
    if 0 in codes and codes[0] > 0:
        return ExitCode(codes[0]) if codes[0] in ExitCode._value2member_map_ else ExitCode.FAILURE
    return ExitCode.FAILURE


def _close_abandoned(run_dir: Path, status: object, message: str) -> None:
    from cockpit_cli.storage.writer import close_abandoned_run

    try:
        close_abandoned_run(run_dir, status, message)
    except OSError as error:
        raise CockpitError(f"cannot update {run_dir}: {error.strerror}", "the records in it are intact", ExitCode.FAILURE) from None
