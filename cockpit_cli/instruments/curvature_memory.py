"""Whether the curvature diagonal's backpropagated factor fits in the memory there is.

BackPACK's ``DiagHessian`` and ``DiagGGNExact`` backpropagate a factor of ``V`` columns per sample
through every layer, ``[V, N, *output]`` at each layer's output. ``V`` is the number of classes
less one for cross-entropy (:mod:`cross_entropy_factor`), the output size for the squared error,
and one for ``ggn_mc`` (one Monte-Carlo sample); the Hessian's adds, at every layer with a second
derivative (Tanh, GELU, ...), its residual: a column per element of that layer's output, which the
layers before it backpropagate too. With many classes that factor dwarfs training:
cifar100_3c3d at batch 128 took 4.9 GiB more than plain training (cifar10_3c3d: 0.47 GiB), and
cifar100_allcnnc at batch 256 would take about 19 GiB. The memory above plain training's was measured at
1.9 to 2.4 times the largest factor (cifar100_3c3d, cifar10_3c3d, a one-convolution network), so
:data:`FACTOR_COPIES` leaves a margin. Where the estimate exceeds the memory available, the
curvature quantities are skipped with the reason and a way out, and training goes on, instead of
the process running out of memory.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from cockpit_cli.instruments.model_hooks import ModelHook

FACTOR_COPIES = 3.0
GIB = 1 << 30


class OutputSizes:
    """The largest number of output elements per sample of ``model``'s leaf modules in the next
    training forward pass, and the columns the Hessian's residuals add (forward hooks, removed by
    :meth:`remove`).

    Args:
        model: The network.
        ignore: Returns whether the current forward pass is one of the engine's own (not measured).
        residual: Returns whether a layer's curvature rule adds a factor of its own, a column per
            element of its output per sample (the Hessian's at a layer with a second derivative).
    """

    def __init__(self, model: nn.Module, ignore: Callable[[], bool], residual: Callable[[nn.Module], bool] | None = None):
        self.largest = 0
        self.residual_columns = 0
        self.ignore = ignore
        self.residual = residual
        leaves = [module for module in model.modules() if not list(module.children())]
        self.handles = [module.register_forward_hook(ModelHook(self._record)) for module in leaves]

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() > 0 and output.shape[0] > 0 and not self.ignore():
            self.largest = max(self.largest, output[0].numel())
            if self.residual is not None and self.residual(module):
                self.residual_columns += output[0].numel()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def factor_columns(curvature: str, loss_function: object, outputs: Tensor) -> int:
    """Return ``V``, the columns per sample of the backpropagated factor.

    Args:
        curvature: ``"hessian"``, ``"ggn"`` or ``"ggn_mc"``.
        loss_function: The (mean-reduced) loss module.
        outputs: The model's outputs ``[N, C]``.
    """
    if curvature == "ggn_mc":
        return 1
    if isinstance(loss_function, nn.CrossEntropyLoss) and outputs.dim() == 2:
        return max(outputs.shape[1] - 1, 1)  # over extra axes, BackPACK's factor of a column per output
    return int(outputs[0].numel())


def available_bytes(device: torch.device) -> int | None:
    """Return the memory that tensors on ``device`` can still take, or ``None`` where unknown.

    On CUDA, the free device memory plus what PyTorch's allocator holds unused; on the CPU,
    ``MemAvailable`` of ``/proc/meminfo`` (Linux).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def shortfall(
    columns: int, batch_size: int, largest_output: int, element_size: int, available: int | None, curvature: str, residual_columns: int = 0
) -> str | None:
    """Return why the curvature factor would not fit (with the way out), or ``None`` if it fits
    or the memory available is unknown.

    Args:
        columns: ``V``, the loss's columns.
        batch_size: ``N`` (this process's).
        largest_output: The largest layer output, in elements per sample.
        element_size: Bytes per element.
        available: Bytes available (``None``: unknown).
        curvature: The curvature asked for.
        residual_columns: The columns the Hessian's residuals add (:class:`OutputSizes`).
    """
    if available is None:
        return None
    total = columns + residual_columns
    needed = FACTOR_COPIES * total * batch_size * largest_output * element_size
    if needed <= available:
        return None
    ways = []
    if residual_columns:
        ways.append(
            "use the ggn curvature (the Hessian without the layers' second derivatives: instruments.curvature: ggn, or curvature=\"ggn\")"
        )
    if curvature != "ggn_mc":
        ways.append("use the ggn_mc curvature (one column per sample: instruments.curvature: ggn_mc, or curvature=\"ggn_mc\")")
    columns_said = f"{total} column(s)" + (f", {residual_columns} of them the residuals of layers with a second derivative," if residual_columns else "")
    return (
        f"the curvature diagonal ({curvature}) would need about {_size(needed)} (a factor of {columns_said} "
        f"per sample, {batch_size} samples, up to {largest_output:,} numbers per sample at a layer's "
        f"output), but only {_size(available)} are available; {''.join(way + ', ' for way in ways)}use a smaller batch, or a "
        "machine with more memory"
    )


def _size(size: float) -> str:
    """``27.8 GiB``, or ``14 MiB`` below a GiB."""
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / (1 << 20):.0f} MiB"
