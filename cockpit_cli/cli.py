"""The ``cockpit`` command line.

The only place that catches :class:`CockpitError`: it prints ``error: <message>`` and the hint
on standard error and exits with the error's code. ``--traceback`` re-raises instead. Heavy
imports (torch) happen inside the commands that need them, so ``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cockpit_cli import __version__
from cockpit_cli.errors import CockpitError, ExitCode, OutputClosed, PeerStopped
from cockpit_cli.launch import environment_world, process_label, use_huge_pages, worker_signals

app = typer.Typer(
    name="cockpit",
    help="Train benchmark problems with instruments attached, watch them, and diagnose the run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
class _Output(Console):
    """Standard output, which ends the command with :class:`OutputClosed` when its reader goes away."""

    def on_broken_pipe(self) -> None:
        try:
            super().on_broken_pipe()  # quiet from now on, the descriptor pointed at /dev/null
        except SystemExit:
            raise OutputClosed(int(ExitCode.FAILURE)) from None


stdout = _Output(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

TracebackOption = Annotated[bool, typer.Option("--traceback", help="Show the full Python traceback on errors.")]


@contextlib.contextmanager
def reporting_errors(show_traceback: bool) -> Iterator[None]:
    """Turn errors into one ``error:`` line and an exit code (or re-raise with ``--traceback``)."""
    try:
        yield
    except CockpitError as error:
        if show_traceback:
            raise
        label = process_label()  # another process than rank 0 of a data-parallel run
        if label and (isinstance(error, PeerStopped) or error.code == ExitCode.BAD_INPUT):
            raise typer.Exit(int(error.code)) from None  # rank 0 says it once for the whole run
        stderr.print(f"[bold red]error:[/] {escape(label + error.message)}", markup=True, highlight=False)
        if error.hint:
            stderr.print(f"[dim]hint:[/] {escape(error.hint)}", markup=True, highlight=False)
        raise typer.Exit(int(error.code)) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as error:  # a defect, not bad input: still one line unless asked for more
        if show_traceback:
            raise
        stderr.print(f"[bold red]error:[/] {escape(f'{process_label()}unexpected {type(error).__name__}: {error}')}", markup=True, highlight=False)
        stderr.print("[dim]hint:[/] rerun with --traceback to see where it happened", markup=True)
        raise typer.Exit(int(ExitCode.FAILURE)) from None


def _version_callback(value: bool) -> None:
    if value:
        stdout.print(f"cockpit {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train benchmark problems with instruments attached, watch them, and diagnose the run."""


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config of the run (see configs/).", show_default=False)] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override a config key: --set optimizer.lr=0.01 (repeatable).")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Parent directory of the run directory (output.directory).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", "-n", help="Name of the run directory (output.name).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the config, build problem and optimizer, print the effective config, exit.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory of the same name.")] = False,
    live: Annotated[
        Optional[bool],
        typer.Option("--live/--no-live", help="Live dashboard, or a plain log line every training.log_every steps. Default: live on a terminal unless CI is set.", show_default=False),
    ] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue RUN_DIR from its last checkpoint (training.checkpoint_every).", show_default=False)] = None,
    nproc: Annotated[
        Optional[int],
        typer.Option("--nproc", min=1, help="Train on N data-parallel processes (distributed.nproc), started through torch.distributed.run.", show_default=False),
    ] = None,
    traceback: TracebackOption = False,
) -> None:
    """Train the problem in CONFIG with instruments attached and write a run directory."""
    with reporting_errors(traceback):
        from cockpit_cli.runner import execute_run

        from cockpit_cli.config import OptionOverride

        overrides = list(set_) + ([OptionOverride(f"distributed.nproc={nproc}", f"--nproc {nproc}")] if nproc is not None else [])
        code = execute_run(
            config, overrides=overrides, out=out, name=name, dry_run=dry_run, overwrite=overwrite, console=stdout, errors=stderr, live=live, resume=resume, traceback=traceback
        )
    raise typer.Exit(int(code))


@app.command()
def watch(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to show (written by `cockpit run`).", show_default=False)],
    follow: Annotated[
        Optional[bool],
        typer.Option("--follow/--no-follow", help="Keep following the files for new records. Default: follow while the run is running.", show_default=False),
    ] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds between reads of the run's files.")] = 1.0,
    traceback: TracebackOption = False,
) -> None:
    """Show the live dashboard of RUN_DIR, one being written by another process or a finished one."""
    with reporting_errors(traceback):
        from cockpit_cli.display.watch import watch_run

        code = watch_run(run_dir, stdout, follow=follow, interval=interval)
    raise typer.Exit(int(code))


@app.command()
def problems(
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    traceback: TracebackOption = False,
) -> None:
    """List every problem with its data set, model, size and DeepOBS defaults."""
    with reporting_errors(traceback):
        from cockpit_cli.problem_table import problem_rows, render_problem_table

        rows = problem_rows()
        if as_json:
            stdout.print_json(json.dumps({"schema_version": 1, "problems": rows}))
        else:
            stdout.print(render_problem_table(rows, width=stdout.width))


@app.command()
def quantities(
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    traceback: TracebackOption = False,
) -> None:
    """List every instrument quantity, what it needs, and which presets track it."""
    with reporting_errors(traceback):
        from cockpit_cli.quantity_table import quantity_rows, render_quantity_table

        rows = quantity_rows()
        if as_json:
            stdout.print_json(json.dumps({"schema_version": 1, "quantities": rows}))
        else:
            stdout.print(render_quantity_table(rows))


@app.command()
def diagnose(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `cockpit run`.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON (schema_version 1).")] = False,
    fail_on: Annotated[Optional[str], typer.Option("--fail-on", help="Exit 1 when a finding is at least this severe: info, warning or error.")] = None,
    traceback: TracebackOption = False,
) -> None:
    """Name what went wrong in a run: findings with evidence, meaning and what to try."""
    with reporting_errors(traceback):
        from cockpit_cli.diagnosis.command import run_diagnose

        code = run_diagnose(run_dir, as_json, fail_on, stdout)
    raise typer.Exit(int(code))


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories, directories holding runs, or glob patterns (two runs or more).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG with the runs overlaid to this file.", dir_okay=False)] = None,
    metric: Annotated[list[str], typer.Option("--metric", "-m", help="Also show this metric: a scalar quantity (NormTest) or an evaluation metric (valid.loss); the first evaluation metric decides which run is better (repeatable).")] = [],  # noqa: B006
    traceback: TracebackOption = False,
) -> None:
    """Compare runs: config differences, outcome, instruments, findings, and which did better."""
    with reporting_errors(traceback):
        from cockpit_cli.compare_render import run_compare
        from cockpit_cli.diagnosis import diagnose as diagnose_run

        def findings(run: object) -> list[dict]:
            return [finding.to_dict() for finding in diagnose_run(run).findings]

        code = run_compare(runs, list(metric), as_json=as_json, plot=plot, console=stdout, findings=findings)
    raise typer.Exit(int(code))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (written by `cockpit run`).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for the figures (default: the run directory).")] = None,
    step_range: Annotated[Optional[str], typer.Option("--step-range", help="Show only steps A to B, e.g. 100:500.", show_default=False)] = None,
    traceback: TracebackOption = False,
) -> None:
    """Write the run's figures: cockpit.png, layers.png and samples.png."""
    with reporting_errors(traceback):
        from cockpit_cli.report.command import run_report

        code = run_report(run_dir, out, step_range, stdout)
    raise typer.Exit(int(code))


def main() -> None:
    """Entry point of the ``cockpit`` script."""
    use_huge_pages()
    if environment_world() is None:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        app()
        return
    worker_signals()  # a process of a data-parallel run: its launcher's signals are acted on between steps
    try:
        app()
    except SystemExit as ended:
        code = ended.code if isinstance(ended.code, int) else int(ended.code is not None)
    else:
        code = 0
    # Everything is written; skip the interpreter's teardown, where the C++ threads of the
    # process group can abort a process that is done (and turn a finished run into a failure).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Treat SIGTERM like Ctrl-C, so the run is closed cleanly as ``interrupted``."""
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
