"""Curvature diagonals of an Embedding's table from the rows each sample's ids touch.

The curvature extensions backpropagate a symmetric factor ``S`` of the loss's curvature, at an
Embedding's output ``[V, N, *, D]`` (``V`` columns; ``*`` the positions of each sample's ids).
Sample ``n``'s column ``v`` of the factor, taken back to the table, is zero but in the rows of
the sample's ids: row ``r`` holds ``sum_(l: id_nl = r) S_vnl`` (none at ``padding_idx``), so

    diag[r] = sum_v sign_v sum_(n touching r) (sum_(l: id_nl = r) S_vnl)^2        ([V_table, D])

with ``sign_v`` +1 except for the Hessian's negative residual terms. BackPACK's GGN rule forms
every column's product with the whole table for every sample, ``[V, N, V_table, D]``, and an
indicator of every id at every position, which beside a vocabulary cannot fit in memory; here
each (sample, id) pair is summed once, ``V`` times ``D`` numbers per pair, a few columns at a
time. An Embedding is linear in its table and its ids take no gradient, so its rules pass
nothing back and add no residual of their own.
"""

from __future__ import annotations

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn

from cockpit_cli.instruments import row_blocks
from cockpit_cli.instruments.factored_batch_grad import FactorableEmbeddingDerivatives


def embedding_weight_diagonal(module: nn.Embedding, factor: Tensor) -> Tensor:
    """Return ``sum_v sum_n (S_vn taken back to the table)^2``, ``[V_table, D]``.

    Args:
        module: The Embedding, with BackPACK's stored ids ``module.input0`` (``[N, *]``).
        factor: ``S``, the backpropagated curvature factor at the output, ``[V, N, *, D]``.
    """
    vocabulary, width = module.weight.shape
    columns, samples = factor.shape[:2]
    factor = factor.reshape(columns, -1, width)  # [V, N * L, D]
    ids = module.input0.reshape(-1)  # [N * L]
    keys = torch.arange(samples, device=ids.device).repeat_interleave(ids.numel() // samples) * vocabulary + ids
    if module.padding_idx is not None:  # its row gets no gradient, and no curvature
        kept = ids != module.padding_idx
        keys, factor = keys[kept], factor[:, kept]
    pairs, pair_of = torch.unique(keys, return_inverse=True)  # each (sample, id) once
    rows = pairs % vocabulary
    diagonal = torch.zeros(vocabulary, width, dtype=factor.dtype, device=factor.device)
    step = max(1, row_blocks.CHUNK_ELEMENTS // max(len(pairs) * width, 1))
    for start in range(0, columns, step):
        part = factor[start : start + step]  # [v, N * L, D]
        sums = torch.zeros(part.shape[0], len(pairs), width, dtype=factor.dtype, device=factor.device).index_add_(1, pair_of, part)
        diagonal.index_add_(0, rows, sums.square_().sum(0))
    return diagonal


class _GGNEmbedding(DiagGGNBaseModule):
    """DiagGGN's rule of an Embedding's table (exact or Monte-Carlo), by :func:`embedding_weight_diagonal`."""

    def __init__(self) -> None:
        super().__init__(derivatives=FactorableEmbeddingDerivatives(), params=["weight"])

    def weight(self, ext: BackpropExtension, module: nn.Embedding, g_inp: tuple, g_out: tuple, backproped: Tensor) -> Tensor:
        self.derivatives._check_parameters(module)
        return embedding_weight_diagonal(module, backproped)


class _HessianEmbedding(DiagHBaseModule):
    """DiagHessian's rule of an Embedding's table, by :func:`embedding_weight_diagonal`, its
    factors signed."""

    def __init__(self) -> None:
        super().__init__(derivatives=FactorableEmbeddingDerivatives(), params=["weight"])

    def weight(self, ext: BackpropExtension, module: nn.Embedding, g_inp: tuple, g_out: tuple, backproped: dict) -> Tensor:
        self.derivatives._check_parameters(module)
        diagonal = torch.zeros_like(module.weight)
        for factor, sign in zip(backproped["matrices"], backproped["signs"]):
            diagonal.add_(embedding_weight_diagonal(module, factor), alpha=sign)
        return diagonal


def set_embedding_rules(extension: BackpropExtension, hessian: bool) -> None:
    """Give ``extension`` (DiagHessian where ``hessian``, else DiagGGNExact or DiagGGNMC) the
    Embedding rule above."""
    extension.set_module_extension(nn.Embedding, _HessianEmbedding() if hessian else _GGNEmbedding(), overwrite=True)
