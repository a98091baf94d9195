"""``cockpit run``: config -> built run -> run directory, with the user-facing messages."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console
from rich.syntax import Syntax

from cockpit_cli.config import OptionOverride, RunConfig, load_config
from cockpit_cli.errors import CockpitError, ExitCode, OutputClosed
from cockpit_cli.launch import check_shards, ending_with_peers, environment_world, user_command
from cockpit_cli.training.events import RunEnd, RunStatus

if TYPE_CHECKING:  # torch is imported only when a run is built
    from cockpit_cli.storage.reader import RunData
    from cockpit_cli.storage.writer import RunWriter
    from cockpit_cli.training.build import RunSetup
    from cockpit_cli.training.distributed import Processes


def resolve_config(config_path: Path, overrides: list[str], out: Path | None, name: str | None) -> RunConfig:
    """Load the config with ``--set`` overrides, then ``--out`` / ``--name`` on top."""
    extra = list(overrides)
    if out is not None:
        extra.append(OptionOverride(f"output.directory={json.dumps(str(out))}", f"--out {out}"))
    if name is not None:
        extra.append(OptionOverride(f"output.name={json.dumps(name)}", f"--name {name}"))
    return load_config(config_path, extra)


def use_live_display(requested: bool | None, console: Console, errors: Console) -> bool:
    """Whether to draw the live dashboard: asked for (``--live``), or by default on a terminal
    outside CI. Without a terminal there is only the plain log, whatever was asked for."""
    if not console.is_terminal:
        if requested:
            errors.print("note: --live needs a terminal; standard output is not one, so the plain log follows", style="dim")
        return False
    return requested if requested is not None else not os.environ.get("CI")


@ending_with_peers
def execute_run(
    config_path: Path | None,
    overrides: list[str],
    out: Path | None,
    name: str | None,
    dry_run: bool,
    overwrite: bool,
    console: Console,
    errors: Console,
    live: bool | None = None,
    resume: Path | None = None,
    traceback: bool = False,
) -> ExitCode:
    """Run (or, with ``dry_run``, only build) the training described by ``config_path``.

    With ``distributed.nproc`` above 1, this process becomes the launcher of that many processes
    (:mod:`launch`), each of which comes back here as a worker of the data-parallel run.

    Args:
        live: Draw the live dashboard (``None``: on a terminal outside CI), else the plain log.
        resume: A run directory to continue from its checkpoint (instead of ``config_path``).
        traceback: Pass ``--traceback`` on to the processes of a data-parallel run.

    Returns:
        The exit code: OK when completed, FAILURE when diverged, INTERRUPTED on Ctrl-C.
    """
    checkpoint = None
    if resume is not None:
        if config_path is not None or overrides or out or name or overwrite:
            raise CockpitError("--resume continues a run with its own config", "give only --resume RUN_DIR (with --live/--no-live if you like)")
        from cockpit_cli.storage.reader import read_run
        from cockpit_cli.training.checkpoint import load_checkpoint

        _check_resumable(read_run(resume), resume)  # a clear error for anything that is not a run directory
        checkpoint = load_checkpoint(resume)
        config = load_config(resume / "config.yaml")
    elif config_path is None:
        raise CockpitError("cockpit run needs a CONFIG file (or --resume RUN_DIR)", "for example: cockpit run configs/quickstart.yaml")
    else:
        config = resolve_config(config_path, overrides, out, name)

    if config.distributed.nproc > 1 and not dry_run and environment_world() is None:
        check_shards(config, config.problem.batch_size, config.distributed.nproc)
        return _launch(config, config_path, overrides, resume, overwrite, live, traceback, errors)

    from cockpit_cli.training.build import build_run, describe_setup, not_tracked  # torch is imported here
    from cockpit_cli.training.distributed import start_processes

    processes = start_processes(config)  # joins the run's process group when it is one of several
    if processes is not None and not processes.is_main:
        console = Console(file=io.StringIO())  # rank 0 speaks for the run
        live = False
    setup = build_run(config)  # every config error surfaces here, before anything is printed
    check_shards(config, setup.batch_size, processes.world_size if processes else config.distributed.nproc)
    console.rule("effective config", style="dim")
    console.print(Syntax(config.to_yaml().rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    facts = describe_setup(setup)
    if config.distributed.nproc > 1:
        from cockpit_cli.training.distributed import choose_backend

        facts["processes"] = f"{config.distributed.nproc} ({choose_backend(config)}), {setup.batch_size // config.distributed.nproc} samples of every batch each"
    if dry_run:
        console.rule("dry run: config is valid", style="dim")
        for key, value in {**facts, **not_tracked(setup)}.items():
            console.print(f"{key:>16}: {_fact_text(value)}", highlight=False)
        return ExitCode.OK

    from cockpit_cli.display.plain import PlainLog
    from cockpit_cli.storage.writer import RunWriter, default_run_name, prepare_run_directory, reopen_run_directory
    from cockpit_cli.training.loop import train

    if processes is not None and not processes.is_main:
        return _train_quietly(setup, config, checkpoint, resume, processes)
    if checkpoint is not None:
        run_dir = resume
        pending = checkpoint["tracker"]["pending"]
        # an evaluation after the checkpoint's last one (the end of its epoch's) is done again
        history = reopen_run_directory(run_dir, pending[0]["step"] if pending else checkpoint["step"], checkpoint["last_eval_step"])
        writer = RunWriter(run_dir, config.to_dict(), config.to_yaml(), resume_evals=history[1])  # the live view and diagnosis see the whole run
        heading = f"resuming {run_dir} at step {checkpoint['step']}"
    else:
        history = None
        run_name = config.output.name or default_run_name(config.problem.name, config.optimizer.name)
        run_dir = prepare_run_directory(Path(config.output.directory).expanduser(), run_name, overwrite=overwrite)
        config = dataclasses.replace(config, output=dataclasses.replace(config.output, name=run_name))
        writer = RunWriter(run_dir, config.to_dict(), config.to_yaml(), command=user_command())
        heading = f"run directory: {run_dir}"
    display = None
    try:
        console.rule(heading, style="dim")
        live_view = use_live_display(live, console, errors)
        if live_view:
            from cockpit_cli.display.dashboard import LiveDashboard

            display = LiveDashboard(console, run_dir=str(run_dir), history=history)
        else:
            display = PlainLog(every=config.training.log_every, console=console)
        end = train(setup, [writer, display, live_diagnosis(config, display.add_alert, history)], run_dir, checkpoint, processes)
    except BaseException as error:
        _close_if_not_started(writer, error, len(history[0]) if history else 0, checkpoint["epoch"] if checkpoint else 0)
        raise
    finally:
        if display is not None:
            display.close()
        if processes is not None:
            processes.close()
    if live_view:
        console.print(display.final_summary())
    write_figures(config, run_dir, errors)
    return report_end(end, run_dir, console, errors, quiet=live_view)


def _close_if_not_started(writer: RunWriter, error: BaseException, steps: int, epochs: int) -> None:
    """Close a run directory that ``error`` left before training could say how it ended (Ctrl-C,
    a closed standard output, a failure between creating the directory and the first step), so
    that it does not read as still running."""
    if writer.manifest.get("status") != RunStatus.RUNNING.value:
        return  # the training loop closed it, with its own reason
    if isinstance(error, KeyboardInterrupt):
        status, message = RunStatus.INTERRUPTED, "interrupted by the user before training started"
    else:
        status, message = RunStatus.FAILED, error.message if isinstance(error, (CockpitError, OutputClosed)) else f"{type(error).__name__}: {error}"
    writer.on_end(RunEnd(status, steps, epochs, message))


def _fact_text(value: Any) -> str:
    """A fact of the dry run as text: ``12,106``; ``train 6,400, valid 1,600`` for a mapping."""
    if isinstance(value, bool) or not isinstance(value, (int, dict)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return ", ".join(f"{key} {_fact_text(item)}" for key, item in value.items())


def _check_resumable(run: RunData, run_dir: Path) -> None:
    """Refuse to resume a run that ended on its own: it would only repeat its last steps."""
    steps = (run.summary or {}).get("steps", len(run.steps))  # a crashed run has no summary
    again = f"start a new run from its config (it trains from the start): cockpit run {run_dir / 'config.yaml'} --name NEW_NAME"
    if run.status == "completed":
        raise CockpitError(f"{run_dir} completed its {steps} steps; there is nothing to resume", f"for more steps, {again} --set training.steps=N")
    if run.status == "diverged":
        raise CockpitError(f"{run_dir} diverged; resuming it would repeat the same steps", f"change what made it diverge (a lower optimizer.lr, say) and {again} --set optimizer.lr=LR")


def _launch(
    config: RunConfig, config_path: Path | None, overrides: list[str], resume: Path | None, overwrite: bool, live: bool | None, traceback: bool, errors: Console
) -> ExitCode:
    """Start the data-parallel processes, each running this command as a worker."""
    from cockpit_cli.launch import launch_processes
    from cockpit_cli.storage.writer import default_run_name

    if resume is not None:
        run_dir, arguments = resume, ["run", "--resume", str(resume)]
    else:
        name = config.output.name or default_run_name(config.problem.name, config.optimizer.name)
        run_dir = Path(config.output.directory).expanduser() / name
        arguments = ["run", str(config_path), *(f"--set={override}" for override in overrides), "--out", str(run_dir.parent), "--name", name]
        arguments += ["--overwrite"] if overwrite else []
    arguments += [] if live is None else ["--live" if live else "--no-live"]
    arguments += ["--traceback"] if traceback else []
    return launch_processes(arguments, config.distributed.nproc, run_dir, errors)


def _train_quietly(setup: RunSetup, config: RunConfig, checkpoint: dict | None, resume: Path | None, processes: Processes) -> ExitCode:
    """A data-parallel process other than rank 0: train its shards, write and show nothing."""
    from cockpit_cli.training.loop import train

    run_dir = resume if resume is not None else Path(config.output.directory).expanduser() / (config.output.name or "")
    try:
        end = train(setup, [], run_dir, checkpoint, processes)
    finally:
        processes.close()
    codes = {RunStatus.COMPLETED: ExitCode.OK, RunStatus.INTERRUPTED: ExitCode.INTERRUPTED}
    return codes.get(end.status, ExitCode.FAILURE)


def write_figures(config: RunConfig, run_dir: Path, errors: Console) -> None:
    """Write the run's figures into its directory; a failure is a note, never a lost run."""
    if not config.output.figures:
        return
    try:
        from cockpit_cli.report import write_report
        from cockpit_cli.storage.reader import read_run

        write_report(read_run(run_dir), run_dir)
    except Exception as error:  # the records are safe on disk; `cockpit report` can retry
        errors.print(f"note: the figures could not be written ({type(error).__name__}: {error}); `cockpit report {run_dir}` retries")


def live_diagnosis(config: RunConfig, alert: Callable[[str, str, str], None], history: tuple[list, list] | None = None) -> object:
    """Return an observer that runs the diagnosis rules during training and raises alerts.

    Args:
        config: The run's config (the rules read the optimizer's settings).
        alert: ``(severity, text, key)``; severity ``info``, ``warning`` or ``critical``.
        history: A resumed run's step and evaluation records from before its checkpoint.
    """
    from cockpit_cli.diagnosis import LiveDiagnosis

    def on_alert(finding: object) -> None:
        severity = "critical" if finding.severity == "error" else finding.severity
        alert(severity, f"{finding.rule}: {finding.meaning} Try: {finding.hint}", finding.rule)

    def on_clear(rule: str, opened: int, step: int) -> None:
        alert("info", f"{rule}: no longer found at step {step} (raised at step {opened})", rule)

    return LiveDiagnosis(on_alert=on_alert, on_clear=on_clear, config=config.to_dict(), history=history)


def report_end(end: RunEnd, run_dir: Path, console: Console, errors: Console, quiet: bool = False) -> ExitCode:
    """Print where the results went and how the run ended; return the exit code.

    Args:
        quiet: Only the exit code and the error lines (a summary was shown already).
    """
    from cockpit_cli.storage.reader import read_run

    if not quiet:
        data = read_run(run_dir)
        final = (data.summary or {}).get("final", {})
        for split, metrics in final.items():
            accuracy = metrics.get("accuracy")
            text = f"{split:>10}: loss {metrics.get('loss'):.4g}" + (f", accuracy {accuracy:.3f}" if accuracy is not None else "")
            console.print(text)
        console.print(f"results in [bold]{run_dir}[/]  (steps: {len(data.steps)}, evaluations: {len(data.evals)})")
        console.print(f"diagnose it with: [bold]cockpit diagnose {run_dir}[/]")
    if end.status is RunStatus.COMPLETED:
        return ExitCode.OK
    from cockpit_cli.training.checkpoint import CHECKPOINT

    resume = f"; continue it from its last checkpoint with: cockpit run --resume {run_dir}" if (run_dir / CHECKPOINT).exists() and end.status is not RunStatus.DIVERGED else ""
    if end.status is RunStatus.INTERRUPTED:
        errors.print(f"interrupted: the run stopped after {end.steps} steps; everything up to then is in {run_dir}{resume}")
        return ExitCode.INTERRUPTED
    raise CockpitError(f"run {end.status.value}: {end.message}", f"records up to step {end.steps} are in {run_dir}{resume}", ExitCode.FAILURE)
