"""A loss module's output that enters the loss backpropagated times a factor.

A loop may backpropagate ``w * loss_fn(outputs, targets)`` (``0.5 * loss``, a loss divided by
the micro-batches it is accumulated over, an auxiliary loss's weight). The values describe that
loss: each sample's loss is ``w`` times the per-sample loss function's, and so are its gradient
and the Hessian with respect to the outputs. The factor with which the module's output enters the
loss is the gradient that reaches the module's output.

* :class:`LossModuleCalls` finds it at a tracked step (a forward hook keeps the module's output
  of the step, a backward pass from the loss to that output alone reads the factor): the passes
  the instruments make themselves from the per-sample loss function (torch.func, forward mode,
  the loss computed again) multiply by it.
* BackPACK's loss rules factor the module's Hessian alone (they only warn that its output "seems
  to have been modified"); they read the factor as ``g_out``, and the rules below multiply the
  module's symmetric factor by ``sqrt(w)``. A factor that is not positive has no such square root.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cockpit_cli.instruments.model_hooks import ModelHook


class LossModuleCalls:
    """Watches the loss module's calls of a tracked step for the factor of its output in the loss.

    Args:
        loss_function: The loss module given to the instruments (a plain function cannot be
            watched: its factor counts as 1).
    """

    def __init__(self, loss_function: object) -> None:
        self.module = loss_function if isinstance(loss_function, nn.Module) else None
        self._handle: RemovableHandle | None = None
        self._output: Tensor | None = None  # the module's last output with a graph, a scalar

    def watch(self) -> None:
        """Keep the module's outputs from now on (before a tracked step's forward pass)."""
        self._output = None
        if self.module is not None and self._handle is None:
            self._handle = self.module.register_forward_hook(ModelHook(self._keep))

    def _keep(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, Tensor) and output.requires_grad and output.numel() == 1:
            self._output = output

    def stop(self) -> None:
        """Remove the hook and drop the output kept (and the graph it holds)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._output = None

    def weight(self, loss: Tensor) -> float:
        """Return the factor with which the module's last output of the step enters ``loss``
        (``d loss / d output``; 1 where the module made no such call, or ``loss`` does not
        contain it), and stop watching. ``loss``'s graph stays for its backward pass."""
        output = self._output
        self.stop()
        if output is None or output is loss or not loss.requires_grad or _plus_terms_without(loss, output):
            return 1.0
        gradient = torch.autograd.grad(loss, output, retain_graph=True, allow_unused=True)[0]
        return 1.0 if gradient is None else float(gradient)


def _plus_terms_without(loss: Tensor, output: Tensor, budget: int = 64) -> bool:
    """Whether ``loss`` is ``output`` plus a term that does not contain it (a constant, or a
    regulariser of at most ``budget`` operations): then its factor is 1, known without the
    backward pass (a small model's tracked step would take a tenth longer)."""
    node, target = loss.grad_fn, output.grad_fn
    if type(node).__name__ != "AddBackward0" or getattr(node, "_saved_alpha", None) != 1:
        return False
    branches = [function for function, _ in node.next_functions]
    if target is None or branches.count(target) != 1:
        return False
    pending, seen = [function for function in branches if function is not target and function is not None], set()
    while pending:  # the other term's operations, up to the budget
        function = pending.pop()
        if function is target or len(seen) >= budget:
            return False
        if id(function) not in seen:
            seen.add(id(function))
            pending.extend(next_function for next_function, _ in function.next_functions if next_function is not None)
    return True


class OutputWeighted:
    """Mixin for BackPACK's loss derivatives: the Hessian factors of ``w`` times the module's loss."""

    def sqrt_hessian(self, module: nn.Module, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        return weighted_factor(super().sqrt_hessian(module, g_inp, g_out, subsampling=subsampling), g_out)  # type: ignore[misc]

    def sqrt_hessian_sampled(self, module: nn.Module, g_inp: tuple, g_out: tuple, mc_samples: int = 1, subsampling: list[int] | None = None) -> Tensor:
        factor = super().sqrt_hessian_sampled(module, g_inp, g_out, mc_samples=mc_samples, subsampling=subsampling)  # type: ignore[misc]
        return weighted_factor(factor, g_out)

    @classmethod
    def _check_loss_has_not_been_modified(cls, module: nn.Module, g_out: tuple) -> None:
        """A weighted output is followed (:func:`weighted_factor`), not warned about."""


def weighted_factor(factor: Tensor, g_out: tuple | None) -> Tensor:
    """Return the module's Hessian factor (any shape) scaled to the loss backpropagated:
    ``sqrt(w) * factor``, with ``w`` the gradient at the module's scalar output."""
    if g_out is None or g_out[0] is None:
        return factor
    weight = float(g_out[0])
    if weight == 1.0:
        return factor
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(
            f"the loss module's output enters the loss backpropagated times {weight:g}: a curvature diagonal needs a positive factor"
        )
    return factor * math.sqrt(weight)
