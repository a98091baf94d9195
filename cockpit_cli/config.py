"""YAML -> a frozen, typed :class:`RunConfig`, with ``--set a.b=c`` overrides.

This module checks structure and types only and never imports torch. Names that need the
registries (problem options, optimizer arguments) are checked when the run is built
(:mod:`cockpit_cli.training.build`), with the same :func:`typed_values.check_value` and the same message shape:
``<file>: <key.path>: <what is wrong>``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cockpit_cli.errors import CockpitError, did_you_mean
from cockpit_cli.overrides import apply_overrides, parse_override
from cockpit_cli.typed_values import check_value
from cockpit_cli.yaml_text import RepeatedKey, load_yaml

Device = Literal["auto", "cpu", "cuda"]
Preset = Literal["none", "economy", "business", "full"]
Curvature = Literal["hessian", "ggn", "ggn_mc"]


def _positive(default: Any = None) -> Any:
    return field(default=default, metadata={"min": 1})


@dataclass(frozen=True)
class ProblemConfig:
    """``problem:`` section. Keys other than these are the problem's own options."""

    name: str = "mnist1d_mlp"
    batch_size: int | None = _positive()
    data_dir: str = "data"
    download: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """``optimizer:`` section: a ``torch.optim`` class name; other keys are its arguments."""

    name: str = "SGD"
    arguments: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1})


@dataclass(frozen=True)
class ScheduleConfig:
    """``schedule:`` section: a ``torch.optim.lr_scheduler`` class; other keys are its arguments."""

    name: str
    interval: Literal["step", "epoch"] = "epoch"
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingConfig:
    """``training:`` section. Give ``epochs`` or ``steps`` (neither: the problem's default epochs)."""

    epochs: int | None = _positive()
    steps: int | None = _positive()
    seed: int = 42
    device: Device = "auto"
    eval_every_epochs: int | None = _positive(1)
    eval_every_steps: int | None = _positive()
    eval_max_batches: int | None = _positive()
    track_samples: int = field(default=512, metadata={"min": 0})
    on_nonfinite: Literal["stop", "skip", "continue"] = "stop"
    clip_grad_norm: float | None = None  # a larger gradient is scaled down to this norm before the update (null: none)
    checkpoint_every: int | None = _positive()  # steps between checkpoints (null: none)
    log_every: int = _positive(50)


@dataclass(frozen=True)
class InstrumentsConfig:
    """``instruments:`` section: which quantities to track and when.

    ``every`` / ``offset`` (linear) or ``spacing: log`` with ``points`` is the preset's schedule;
    ``quantities`` maps a quantity name to ``false`` (leave it out), ``true`` (add it), or a
    mapping of its own schedule keys and options.
    """

    preset: Preset = "economy"
    every: int = _positive(1)
    offset: int = field(default=0, metadata={"min": 0})
    spacing: Literal["linear", "log"] = "linear"
    points: int = _positive(200)
    curvature: Curvature = "hessian"
    quantities: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputConfig:
    """``output:`` section: where the run directory goes."""

    directory: str = "results"
    name: str | None = None
    figures: bool = True  # write cockpit.png, layers.png and samples.png at the end of the run


@dataclass(frozen=True)
class DistributedConfig:
    """``distributed:`` section: data-parallel training on ``nproc`` processes of this machine.

    Each process trains on an equal shard of every batch (the batch size must divide by
    ``nproc``). ``backend: auto`` is NCCL on CUDA and Gloo on the CPU.
    """

    nproc: int = _positive(1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass(frozen=True)
class RunConfig:
    """The whole, validated configuration of a run."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    instruments: InstrumentsConfig = field(default_factory=InstrumentsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    source: str = field(default="<config>", compare=False)
    overrides: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the config in its YAML shape (the free-form keys folded back in)."""
        return {
            "problem": _flatten(self.problem, "options"),
            "optimizer": _flatten(self.optimizer, "arguments"),
            "schedule": None if self.schedule is None else _flatten(self.schedule, "arguments"),
            "training": dataclasses.asdict(self.training),
            "instruments": dataclasses.asdict(self.instruments),
            "output": dataclasses.asdict(self.output),
            "distributed": dataclasses.asdict(self.distributed),
        }

    def to_yaml(self) -> str:
        """Return the effective config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def where(self, path: str) -> str:
        """Where key ``path`` is set: ``"<file>: <path>"``, naming the ``--set`` overrides that touch it."""
        return located(self.source, self.overrides, path)

    def overridden(self, path: str) -> bool:
        """Whether an override sets key ``path``, a key inside it, or the section it is in."""
        return bool(_touching(self.overrides, path))

    def fail(self, path: str, problem: str, hint: str | None = None) -> CockpitError:
        """Build the error for key ``path`` of this config (``<file>: <path>: <problem>``)."""
        return CockpitError(f"{self.where(path)}: {problem}", hint)


class OptionOverride(str):
    """An override that a command-line option of its own sets (``--nproc 2`` sets
    ``distributed.nproc=2``): errors name the option as it was typed."""

    shown_as: str

    def __new__(cls, text: str, shown_as: str) -> OptionOverride:
        override = super().__new__(cls, text)
        override.shown_as = shown_as
        return override


def located(source: str, overrides: typing.Sequence[str], path: str) -> str:
    """``"<source>: <path>"``; ``"<source> with --set <override>: <path>"`` (or the option that
    set it, such as ``--nproc 2``) when an override sets
    ``path``, a key inside it, or the section it is in, so that the error points at the command line."""
    touching = [text.shown_as if isinstance(text, OptionOverride) else f"--set {text}" for text in _touching(overrides, path)]
    return f"{source} with {' '.join(touching)}: {path}" if touching else f"{source}: {path}"


def _touching(overrides: typing.Sequence[str], path: str) -> list[str]:
    """Return the overrides that set ``path``, a key inside it, or the section it is in."""
    touching = []
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key == path or key.startswith(path + ".") or path.startswith(key + "."):
            touching.append(text)
    return touching


# Sections whose unknown keys are collected into a free-form dict instead of being rejected.
_OPEN_SECTIONS = {ProblemConfig: "options", OptimizerConfig: "arguments", ScheduleConfig: "arguments"}


def _flatten(section: Any, open_field: str) -> dict[str, Any]:
    data = dataclasses.asdict(section)
    extra = data.pop(open_field)
    return {**data, **extra}


# ---------------------------------------------------------------------------------------------
# Parsing


def _parse_section(cls: type, data: Any, path: str, where: typing.Callable[[str], str]) -> Any:
    """Build dataclass ``cls`` from mapping ``data``, rejecting unknown keys and wrong types.

    ``where(key_path)`` gives the start of an error message about that key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CockpitError(f"{where(path)}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("source", "overrides")}
    open_field = _OPEN_SECTIONS.get(cls)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            raise CockpitError(f"{where(key_path)}: keys must be strings")
        if key not in fields or key == open_field:
            if open_field is not None:
                extra[key] = value
                continue
            known = sorted(fields)
            raise CockpitError(
                f"{where(key_path)}: unknown key{did_you_mean(key, known)}",
                f"keys allowed under {path or 'the top level'}: {', '.join(known)}",
            )
        hint = hints[key]
        section_type = _section_type(hint)
        if section_type is not None:
            values[key] = None if value is None and _optional(hint) else _parse_section(section_type, value, key_path, where)
        else:
            minimum = fields[key].metadata.get("min")
            values[key] = check_value(value, hint, where(key_path), minimum)
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in values]
    if missing:
        raise CockpitError(f"{where(f'{path}.{missing[0]}')}: required key is missing")
    if open_field is not None:
        values[open_field] = extra
    return cls(**values)


def _section_type(hint: Any) -> type | None:
    """Return the dataclass inside ``hint`` (``X`` or ``X | None``), if it is one."""
    candidates = [hint, *typing.get_args(hint)]
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def parse_config(data: Any, source: str = "<config>", overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Validate a plain mapping (as loaded from YAML) into a :class:`RunConfig`.

    Args:
        data: The mapping.
        source: Where it came from, for error messages (the file's path).
        overrides: The ``--set`` overrides already applied to it, named in error messages about
            the keys they set.
    """
    overrides = tuple(overrides)
    config = _parse_section(RunConfig, data, "", lambda path: located(source, overrides, path))
    config = dataclasses.replace(config, source=source, overrides=overrides)
    training_keys = (data or {}).get("training") or {}
    if "eval_every_steps" in training_keys and "eval_every_epochs" not in training_keys:
        # Evaluating by steps replaces the default of evaluating every epoch.
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, eval_every_epochs=None))
    _check_consistency(config)
    return config


def _check_consistency(config: RunConfig) -> None:
    training = config.training
    if training.epochs is not None and training.steps is not None:
        raise config.fail("training", "give either epochs or steps, not both")
    if training.eval_every_epochs is not None and training.eval_every_steps is not None:
        raise config.fail("training", "give either eval_every_epochs or eval_every_steps, not both", "set one of them to null")
    if training.clip_grad_norm is not None and not training.clip_grad_norm > 0:
        raise config.fail("training.clip_grad_norm", f"expected a positive number (the largest gradient norm an update takes), got {training.clip_grad_norm!r}", "use null for no clipping")
    if config.distributed.backend == "nccl" and training.device == "cpu":
        raise config.fail("distributed.backend", "nccl needs CUDA GPUs, but training.device is cpu", "use backend: gloo (or auto) on the CPU")
    name = config.output.name
    if name is not None and not is_safe_name(name):
        raise config.fail("output.name", f"{name!r} is not a safe directory name", "use letters, digits, '.', '_' and '-' only")


def is_safe_name(name: str) -> bool:
    """Return whether ``name`` is one plain directory name that cannot escape its parent."""
    return bool(name) and name not in (".", "..") and not name.startswith(".") and all(c.isalnum() or c in "._-" for c in name)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; clear errors for missing or malformed files and
    for a key given twice in one section."""
    if not path.exists():
        raise CockpitError(f"config file {path} does not exist", "check the path; configs/ has examples")
    if path.is_dir():
        raise CockpitError(f"config {path} is a directory, not a YAML file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except RepeatedKey as error:
        line = error.problem_mark.line + 1
        raise CockpitError(f"{path}: line {line}: {error.problem}", "keep one of them (YAML would use the last and drop the other)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(error, "problem", None) or "invalid YAML"
        raise CockpitError(f"{path}: malformed YAML{where}: {reason}", "fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise CockpitError(f"{path}: not a text file", "a config is a YAML text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CockpitError(f"{path}: expected a mapping with sections problem, optimizer, training, ...")
    return data


# Keys that exclude each other: an override of one replaces the other from the file.
EXCLUSIVE_KEYS = ((("training", "steps"), ("training", "epochs")), (("training", "eval_every_steps"), ("training", "eval_every_epochs")))


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a config file.

    ``--set training.steps=N`` on a config that gives ``epochs`` replaces them (and likewise
    for the evaluation interval), so an override never collides with the file it overrides.
    """
    path = Path(path)
    overrides = overrides or []
    data = read_yaml(path)
    overridden = {tuple(parse_override(text)[0]) for text in overrides}
    for pair in EXCLUSIVE_KEYS:
        for chosen, other in (pair, pair[::-1]):
            section = data.get(chosen[0])
            if chosen in overridden and other not in overridden and isinstance(section, dict):
                section.pop(other[1], None)
    data = apply_overrides(data, overrides)
    return parse_config(data, source=str(path), overrides=overrides)
