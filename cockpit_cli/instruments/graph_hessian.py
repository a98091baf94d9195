"""The Hessian's curvature factors through a graph of layers, where branches meet.

BackPACK's ``DiagHessian`` backpropagates the loss's Hessian at a layer's output as factors with
signs, ``{"matrices": [S_1, ...], "signs": [s_1, ...]}`` (``S_k`` ``[V_k, N, *output]``,
``H = sum_k s_k S_k S_k^T`` per sample): a rule passes every factor back through its layer's
Jacobian, in order, and appends its layer's residual (its second derivative's positive and
negative parts). Its rules follow a chain of layers. In a graph, such as BackPACK's converter
makes of a network with residual connections, a tensor ``x`` that feeds two branches receives a
list from each, and its Hessian is

    H_x = sum_k s_k (J_1 + J_2)^T S_k S_k^T (J_1 + J_2) + the residuals born inside either branch

for the factors ``S_k`` at the point where the branches meet again, ``J_1`` and ``J_2`` the
branches' Jacobians from ``x`` to there. The factors that share an origin are therefore added
(``J_1^T S_k + J_2^T S_k``: the cross terms between the branches come with them), and the others
are kept beside them. Every factor carries its origin (``"origins"``, a token per factor): the
loss's factors and each residual get a fresh one, and a rule's output keeps the origins of the
factors it passed back. The rules get lists of their own, as one list reaches every input of a
sum and BackPACK's rules append to the signs they are given.

The graph's own modules (sums, products with numbers, permutations) get the Hessian's rules of
:mod:`hessian_from_ggn`.
"""

from __future__ import annotations

from typing import Any, Callable

from backpack.extensions import DiagHessian
from backpack.extensions.backprop_extension import BackpropExtension
from torch import nn

from cockpit_cli.instruments.extension_rules import module_rules

Factors = dict[str, list[Any]]  # "matrices": [S_k], "signs": [s_k], "origins": [token_k]


class BranchingDiagHessian(DiagHessian):
    """``DiagHessian`` whose factors add up by origin where branches of a graph meet."""

    def accumulate_backpropagated_quantities(self, existing: Factors, other: Factors) -> Factors:
        return merge_factors(existing, other)


def merge_factors(existing: Factors, other: Factors) -> Factors:
    """Return the factors of a tensor that two branches backpropagate to: those of the same origin
    added, the others kept, in the order of ``existing`` and then ``other``'s new ones. Neither
    input's tensors are changed (a factor may be another branch's too)."""
    matrices, signs, origins = list(existing["matrices"]), list(existing["signs"]), list(existing["origins"])
    position = {origin: index for index, origin in enumerate(origins)}
    for matrix, sign, origin in zip(other["matrices"], other["signs"], other["origins"]):
        index = position.get(origin)
        if index is None:
            matrices.append(matrix)
            signs.append(sign)
            origins.append(origin)
        else:
            matrices[index] = matrices[index] + matrix
    return {"matrices": matrices, "signs": signs, "origins": origins}


def tag_origins(extension: BackpropExtension) -> None:
    """Make every rule of ``extension`` (a ``DiagHessian``) pass its factors' origins back with
    them: those of the factors it was given, then a fresh one for each factor it adds."""
    for rule in module_rules(extension).values():
        rule.backpropagate = _with_origins(rule.backpropagate)


def _with_origins(backpropagate: Callable[..., Factors]) -> Callable[..., Factors]:
    def backpropagate_with_origins(ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: Factors | None) -> Factors:
        origins: list[object] = []
        if backproped is not None:  # None at the loss, where the factors start
            origins = backproped["origins"]
            backproped = {"matrices": list(backproped["matrices"]), "signs": list(backproped["signs"])}
        result = backpropagate(ext, module, g_inp, g_out, backproped)
        added = len(result["matrices"]) - len(origins)
        result["origins"] = list(origins) + [object() for _ in range(added)]
        return result

    return backpropagate_with_origins
