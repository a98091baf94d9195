"""``cockpit run``: config -> built run -> run directory, with the user-facing messages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax

from cockpit_cli.config import RunConfig, load_config
from cockpit_cli.errors import CockpitError, ExitCode
from cockpit_cli.training.events import RunEnd, RunStatus


def resolve_config(config_path: Path, overrides: list[str], out: Path | None, name: str | None) -> RunConfig:
    """Load the config with ``--set`` overrides, then ``--out`` / ``--name`` on top."""
    extra = list(overrides)
    if out is not None:
        extra.append(f"output.directory={json.dumps(str(out))}")
    if name is not None:
        extra.append(f"output.name={json.dumps(name)}")
    return load_config(config_path, extra)


def execute_run(
    config_path: Path,
    overrides: list[str],
    out: Path | None,
    name: str | None,
    dry_run: bool,
    overwrite: bool,
    console: Console,
    errors: Console,
) -> ExitCode:
    """Run (or, with ``dry_run``, only build) the training described by ``config_path``.

    Returns:
        The exit code: OK when completed, FAILURE when diverged, INTERRUPTED on Ctrl-C.
    """
    config = resolve_config(config_path, overrides, out, name)
    console.rule("effective config", style="dim")
    console.print(Syntax(config.to_yaml().rstrip(), "yaml", theme="ansi_dark", background_color="default"))

    from cockpit_cli.training.build import build_run, describe_setup  # torch is imported here

    setup = build_run(config)
    facts = describe_setup(setup)
    if dry_run:
        console.rule("dry run: config is valid", style="dim")
        for key, value in facts.items():
            console.print(f"{key:>16}: {value}")
        return ExitCode.OK

    from cockpit_cli.display.plain import PlainLog
    from cockpit_cli.storage.writer import RunWriter, default_run_name, prepare_run_directory
    from cockpit_cli.training.loop import train

    run_name = config.output.name or default_run_name(config.problem.name, config.optimizer.name)
    run_dir = prepare_run_directory(Path(config.output.directory).expanduser(), run_name, overwrite=overwrite)
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, name=run_name))
    writer = RunWriter(run_dir, config.to_dict(), config.to_yaml())
    console.rule(f"run directory: {run_dir}", style="dim")
    end = train(setup, [writer, PlainLog(every=config.training.log_every, console=console)])
    return report_end(end, run_dir, console, errors)


def report_end(end: RunEnd, run_dir: Path, console: Console, errors: Console) -> ExitCode:
    """Print where the results went and how the run ended; return the exit code."""
    from cockpit_cli.storage.reader import read_run

    data = read_run(run_dir)
    final = (data.summary or {}).get("final", {})
    for split, metrics in final.items():
        accuracy = metrics.get("accuracy")
        text = f"{split:>10}: loss {metrics.get('loss'):.4g}" + (f", accuracy {accuracy:.3f}" if accuracy is not None else "")
        console.print(text)
    console.print(f"results in [bold]{run_dir}[/]  (steps: {len(data.steps)}, evaluations: {len(data.evals)})")
    if end.status is RunStatus.COMPLETED:
        return ExitCode.OK
    if end.status is RunStatus.INTERRUPTED:
        errors.print(f"interrupted: the run stopped after {end.steps} steps; everything up to then is in {run_dir}")
        return ExitCode.INTERRUPTED
    raise CockpitError(f"run {end.status.value}: {end.message}", f"records up to step {end.steps} are in {run_dir}", ExitCode.FAILURE)
