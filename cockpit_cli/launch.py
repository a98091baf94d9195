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

import logging
import os
import signal
from pathlib import Path

from rich.console import Console

from cockpit_cli.errors import CockpitError, ExitCode


def environment_world() -> tuple[int, int, int] | None:
    """Return ``(rank, world_size, local_rank)`` when started as one of several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return None
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Whether this process speaks to the user (the only one, or rank 0 of several)."""
    world = environment_world()
    return world is None or world[0] == 0


def process_label() -> str:
    """``"process r of W: "`` in a process other than rank 0, else ``""`` (prefixes its errors)."""
    world = environment_world()
    return "" if world is None or world[0] == 0 else f"process {world[0]} of {world[1]}: "


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
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    arguments = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "cockpit_cli", *worker_arguments])
    try:
        run(arguments)
    except SignalException as stop:
        _close_abandoned(run_dir, RunStatus.INTERRUPTED, "interrupted by the user")
        return ExitCode.INTERRUPTED if stop.sigval == signal.SIGINT else ExitCode.FAILURE
    except ChildFailedError as failed:
        return _report_failure(failed.failures, nproc, run_dir, errors)
    return ExitCode.OK


def _report_failure(failures: dict, nproc: int, run_dir: Path, errors: Console) -> ExitCode:
    """Say which process died silently, close the run directory, and pick the exit code."""
    from cockpit_cli.training.events import RunStatus

    first = min(failures, key=lambda rank: (failures[rank].timestamp, rank))  # the cause; the launcher ended the others
    cause = failures[first]
    if cause.exitcode < 0:  # died without a word of its own
        errors.print(f"[bold red]error:[/] process {first} of {nproc} was killed by {cause.signal_name()}", markup=True, highlight=False)
        errors.print("[dim]hint:[/] a process killed by the system often ran out of memory; try fewer processes or a smaller batch", markup=True)
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
