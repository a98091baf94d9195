"""Numeric series drawn from a run's records: the vocabulary every diagnosis rule is written in.

:class:`RunSeries` wraps the record lists of a run (finished or still growing) and extracts
named series from them on demand. Each extraction is cached and extended with only the records
added since the last call, so live diagnosis over a growing run stays cheap.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from cockpit_cli.diagnosis.values import as_float, as_floats, field_of, is_number, layer_of
from cockpit_cli.diagnosis.windows import Series, Table, finite_median
from cockpit_cli.storage.schema import from_api

Record = dict[str, Any]

# Where a per-parameter value can be read from: (quantity, field inside it or None), in order.
PER_PARAMETER_SOURCES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "grad_norm": (("GradNorm", None), ("LayerStats", "grad_norm")),
    "update": (("UpdateSize", None), ("LayerStats", "update_ratio")),
    "zero_grad_fraction": (("LayerStats", "zero_grad_fraction"),),
}


class RunSeries:
    """Series extracted from one run's manifest, step records and evaluation records.

    Args:
        manifest: The run's ``run.json`` as a mapping.
        steps: Step records (dicts with ``step``, ``loss``, ``lr``, ``quantities``); may grow.
        evals: Evaluation records (dicts with ``step`` and ``splits``); may grow.
        config: The effective config as a mapping (used for the optimizer's settings).
    """

    def __init__(self, manifest: Record, steps: list[Record], evals: list[Record], config: Record | None = None):
        self.manifest = manifest
        self.steps = steps
        self.evals = evals
        self.config = config or {}
        self._cache: dict[tuple[Any, ...], tuple[int, list[int], list[Any]]] = {}
        self._pairs: dict[str, list[tuple[int, Record]]] = {}
        self._ratios: tuple[int, dict[str, float]] = (-1, {})

    @property
    def parameters(self) -> list[str]:
        """Parameter names in the order of every per-parameter list."""
        return list((self.manifest.get("instruments") or {}).get("parameters") or [])

    def layers(self) -> dict[str, list[int]]:
        """Indices of each layer's parameters, layers in the order their parameters appear."""
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(self.parameters):
            groups.setdefault(layer_of(name), []).append(index)
        return groups

    def _extend(self, key: tuple[Any, ...], items: list[tuple[int, Any]] | Series, convert: Callable[[Any], Any]) -> Series:
        """The cached series ``key``: ``convert(value)`` of every (step, value) where it is not ``None``.

        ``items`` grows over time; only its new entries are converted on each call.
        """
        seen, steps, values = self._cache.get(key, (0, [], []))
        pairs = zip(items.steps[seen:], items.values[seen:]) if isinstance(items, Series) else items[seen:]
        for step, value in pairs:
            converted = convert(value)
            if converted is not None:
                steps.append(step)
                values.append(converted)
        self._cache[key] = (len(items), steps, values)
        return Series(steps, values)

    def _records(self, source: str) -> list[tuple[int, Record]]:
        """``(step, record)`` of every step or evaluation record (extended as records arrive)."""
        records = self.evals if source == "evals" else self.steps
        pairs = self._pairs.setdefault(source, [])
        pairs.extend((int(record.get("step", 0)), record) for record in records[len(pairs) :])
        return pairs

    def raw(self, quantity: str) -> Series:
        """The stored value of ``quantity`` at every step that tracked it (any JSON type)."""
        return self._extend(("raw", quantity), self._records("steps"), lambda record: (record.get("quantities") or {}).get(quantity))

    def count(self, name: str) -> int:
        """Number of records holding ``name``: a quantity, ``loss``, ``lr`` or ``evals``."""
        special = {"loss": self.loss, "lr": self.lr, "evals": lambda: self.evaluation("valid", "loss")}
        return len(special[name]() if name in special else self.raw(name))

    def loss(self) -> Series:
        """The mini-batch loss of every step (non-finite values kept)."""
        return self._extend(("loss",), self._records("steps"), lambda record: as_float(record.get("loss")))

    def lr(self) -> Series:
        """The largest learning rate over the parameter groups at every step."""

        def largest(record: Record) -> float | None:
            rates = [rate for rate in record.get("lr") or [] if is_number(rate)]
            return float(max(rates)) if rates else None

        return self._extend(("lr",), self._records("steps"), largest)

    def scalar(self, quantity: str, field: str | None = None) -> Series:
        """A scalar quantity (``Alpha``), or one ``field`` of a dict-valued one (``InputStats``, ``mean``)."""
        return self._extend(("scalar", quantity, field), self.raw(quantity), lambda value: as_float(field_of(value, field)))

    def finite_scalar(self, quantity: str) -> Series:
        """The finite values of a scalar quantity (after a divergence: those before it); kept up
        to date as records arrive, as :meth:`scalar` is (a live check reads it every 25 steps)."""

        def finite(value: Any) -> float | None:
            number = as_float(value)
            return number if number is not None and math.isfinite(number) else None

        return self._extend(("finite", quantity), self.raw(quantity), finite)

    def source(self, kind: str) -> tuple[str, str | None] | None:
        """The first tracked source of a per-parameter ``kind`` (see :data:`PER_PARAMETER_SOURCES`)."""
        return next((item for item in PER_PARAMETER_SOURCES[kind] if self.count(item[0])), None)

    def per_parameter(self, kind: str) -> Table:
        """Per-parameter values of ``kind`` at every step that tracked its source."""
        found = self.source(kind)
        if found is None:
            return Table([], [])
        quantity, field = found
        series = self._extend(("vector", quantity, field), self.raw(quantity), lambda value: as_floats(field_of(value, field)))
        return Table(series.steps, series.values)

    def total_norm(self, kind: str = "grad_norm") -> Series:
        """The norm over all parameters at every tracked step."""
        return self._extend(("total", kind), self.per_parameter(kind), lambda row: math.sqrt(sum(x * x for x in row)))

    def layer_ratios(self) -> dict[str, float]:
        """Per layer but the last, the recent median of its gradient norm over the last layer's."""
        table = self.per_parameter("grad_norm")
        if self._ratios[0] == len(table):
            return self._ratios[1]
        layers, width = self.layers(), len(self.parameters)
        rows = [row for row in table.recent().values if len(row) == width]
        norms = [[math.sqrt(sum(row[i] ** 2 for i in indices)) for indices in layers.values()] for row in rows]
        ratios = [[x / row[-1] if row[-1] > 0 else math.nan for x in row[:-1]] for row in norms]
        result = {name: finite_median([row[i] for row in ratios]) for i, name in enumerate(list(layers)[:-1])}
        self._ratios = (len(table), result)
        return result

    def nested(self, quantity: str, field: str) -> dict[str, Series]:
        """For a quantity keyed by layer (``Activations``): ``field`` of each layer as a series."""
        raw, keys = self.raw(quantity), {}
        for item in raw.sample(50).values:
            keys.update(dict.fromkeys(item if isinstance(item, dict) else {}))
        return {key: self._extend(("nested", quantity, key, field), raw, lambda value, key=key: as_float(field_of(value, key, field))) for key in keys}

    def evaluation(self, split: str, metric: str) -> Series:
        """``metric`` (``loss`` or ``accuracy``) on ``split`` at every evaluation that has it."""
        return self._extend(("eval", split, metric), self._records("evals"), lambda record: as_float(field_of(record, "splits", split, metric)))

    def optimizer_setting(self, name: str, default: float = 0.0) -> float:
        """A numeric optimizer argument from the config (``momentum``), ``default`` when absent."""
        value = (self.config.get("optimizer") or {}).get(name, default)
        return float(value) if is_number(value) else default

    def clipping_advice(self) -> str:
        """How this run can clip its gradients: the config key, harder where it clips already, or
        torch's function for a run of the Python API."""
        if from_api(self.manifest):
            return "clip gradients (torch.nn.utils.clip_grad_norm_ before optimizer.step())"
        limit = (self.config.get("training") or {}).get("clip_grad_norm")
        if is_number(limit):
            return f"clip gradients harder (training.clip_grad_norm is {limit:g} here)"
        return "clip gradients (training.clip_grad_norm)"

    def optimizer(self) -> str:
        """The optimizer's class name from the manifest (or the config)."""
        return str(self.manifest.get("optimizer") or (self.config.get("optimizer") or {}).get("name") or "")


def recent_histograms(run: RunSeries, quantity: str = "GradHist1d", count: int = 20) -> Series:
    """At most ``count`` of the recent tracked histograms that counted anything, spread evenly
    (histograms are costly to scan; after a divergence they count no element, all being NaN)."""
    def counted(series: Series) -> Series:
        kept = [(step, value) for step, value in zip(series.steps, series.values) if isinstance(value, dict) and any(value.get("counts") or ())]
        return Series([step for step, _ in kept], [value for _, value in kept])

    raw = run.raw(quantity)
    recent = counted(raw.last())
    return (recent if len(recent) else counted(raw).last()).sample(count)  # after a divergence: the last before it
