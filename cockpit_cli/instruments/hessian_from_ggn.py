"""The Hessian's rules of layers whose output is linear in each parameter, from the GGN's rules.

A parameter ``w`` that a layer's output ``y`` depends on linearly has ``d^2 y / dw^2 = 0``, so its
Hessian diagonal is the curvature at the output taken through ``J_w`` alone:

    diag_w = sum_k s_k diag(J_w^T S_k S_k^T J_w)     (the GGN's diagonal of factor S_k, signed)

for the Hessian's factors ``S_k`` with signs ``s_k`` at the output (:mod:`graph_hessian`). Linear
and convolution layers, normalisation layers (scale and shift) and the modules of BackPACK's
graphs have such parameters. A layer that is moreover affine in its input (sums, products with
numbers, permutations, batch norm in eval mode) passes the factors back through the GGN's
Jacobian and adds no residual: its Hessian's rule is the GGN's entirely.
"""

from __future__ import annotations

from typing import Any

from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.mat_to_mat_jac_base import MatToJacMat
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn

from cockpit_cli.instruments.extension_rules import module_rules

Factors = dict[str, list[Any]]


class ParameterHessianFromGGN(DiagHBaseModule):
    """A Hessian's rule whose parameters' diagonals are the signed sums of the GGN rule's.

    Args:
        ggn_rule: The layer's ``DiagGGN`` rule (its ``weight`` and ``bias`` methods, where it has them).
        derivatives: The derivatives that pass the factors back (and say whether the layer adds a residual).
    """

    def __init__(self, ggn_rule: Any, derivatives: Any):
        self._ggn_rule = ggn_rule
        params = [name for name in ("bias", "weight") if hasattr(ggn_rule, name)]
        super().__init__(derivatives=derivatives, params=params)

    def _parameter_diagonal(self, name: str, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: Factors) -> Tensor:
        rule = getattr(self._ggn_rule, name)
        total = None
        for matrix, sign in zip(backproped["matrices"], backproped["signs"]):
            part = rule(ext, module, g_inp, g_out, matrix).mul_(sign)
            total = part if total is None else total.add_(part)
        return total

    def weight(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: Factors) -> Tensor:
        return self._parameter_diagonal("weight", ext, module, g_inp, g_out, backproped)

    def bias(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: Factors) -> Tensor:
        return self._parameter_diagonal("bias", ext, module, g_inp, g_out, backproped)


class _NoSecondDerivative:
    """A layer's BackPACK derivatives, saying that the layer has no second derivative."""

    def __init__(self, derivatives: Any):
        self._derivatives = derivatives

    def hessian_is_zero(self, module: nn.Module) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_derivatives":  # (copying asks before the instance has its attributes)
            raise AttributeError(name)
        return getattr(self._derivatives, name)


def set_affine_layer_rules(hessian: BackpropExtension, ggn: BackpropExtension, layers: tuple[type, ...]) -> None:
    """Give ``hessian`` a rule for each class of ``layers`` (affine in their input and in each
    parameter) that is ``ggn``'s rule of it applied to each factor, with no residual."""
    rules = module_rules(ggn)
    for layer in layers:
        rule = rules[layer]
        hessian.set_module_extension(layer, ParameterHessianFromGGN(rule, _NoSecondDerivative(rule.derivatives)), overwrite=True)


def passed_back_with_residual(rule: DiagHBaseModule, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: Factors, residual: list[tuple[Tensor, float]]) -> Factors:
    """Return the factors ``backproped`` passed back through the layer's Jacobian (``rule``'s
    derivatives) followed by the layer's own ``residual`` factors with their signs: the Hessian's
    backpropagation at a layer whose second derivative is no diagonal, which BackPACK's rules
    cannot take."""
    matrices = MatToJacMat.backpropagate(rule, ext, module, g_inp, g_out, backproped["matrices"])
    signs = list(backproped["signs"])
    for factor, sign in residual:
        matrices.append(factor)
        signs.append(sign)
    return {"matrices": matrices, "signs": signs}
