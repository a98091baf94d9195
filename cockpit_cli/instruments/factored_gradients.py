"""Per-sample weight gradients of Linear and convolution layers, formed block by block of samples.

The weight gradient of sample i of a Linear layer is a product of two small factors, its input
``x_i`` (``[L, in]``) and its output gradient ``delta_i`` (``[L, out]``, with ``L`` the extra
positions, 1 for a plain MLP); that of a convolution the same product with ``x_i`` replaced by
its unfolded patches (``[L, C_in * prod(kernel)]``, ``L`` the output positions):

    G[i] = N * delta_i^T @ x_i + lambda * theta        (shape of the weight, flattened to [D])

where ``delta`` is the gradient of the mean loss (hence the factor N) and ``lambda * theta`` the
regulariser's gradient. The sources below keep only the factors and form ``G`` one block of
samples at a time (:mod:`sample_pass`), so that the ``[N, D]`` block of a large layer never
exists. The mean gradient and the products ``G[i] . v`` with a vector need no per-sample
gradients at all: ``sum_i delta_i^T @ x_i``, and ``delta_i`` times the layer's output for the
input ``x_i`` with ``v`` as its weight.

:func:`factored_batch_grad.factored_batch_grad` is BackPACK's ``BatchGrad`` with weight rules that
return such a source (in ``grad_batch``) instead of the tensor.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cockpit_cli.instruments import row_blocks
from cockpit_cli.instruments.convolutions import padded, unfold, zero_padding
from cockpit_cli.instruments.histograms import HistogramSpec
from cockpit_cli.instruments.outer_histogram import outer_histogram, outer_joint_histogram


# centered_sum sums its crossed terms over the samples where its terms cancel beyond this factor.
CANCELLATION_LIMIT = 100.0
# float64 copies of a layer's numbers (the centred sum's) are made this many elements at a time:
# 128 KiB, a small fraction of the memory of any layer large enough for them to matter.
WIDE_BLOCK_ELEMENTS = 1 << 14


class FactoredSamples:
    """Per-sample weight gradients ``G`` (``[N, D]``) of a layer, kept as their factors.

    Args:
        grad_outputs: ``delta``, the output gradients of the mean loss, ``[N, C_out, L]``.
        weight_shape: The weight's shape (``[C_out, ...]``, ``D`` elements).
    """

    scratch_blocks = True  # every block is formed anew from the factors

    def __init__(self, grad_outputs: Tensor, weight_shape: torch.Size):
        self.delta = grad_outputs
        self.n = len(grad_outputs)
        self.weight_shape = weight_shape
        self.theta: Tensor | None = None
        self.decay = 0.0
        self._data_mean: Tensor | None = None
        self._mean: Tensor | None = None  # given by take_mean

    def regularized(self, theta: Tensor, decay: float) -> FactoredSamples:
        """Include the regulariser's gradient ``decay * theta`` in every ``G[i]`` (returns self)."""
        self.theta, self.decay = theta.detach(), decay
        return self

    def unscale(self, scale: float) -> None:
        """Divide the output gradients by ``scale``, those of a loss backpropagated times ``scale``."""
        self.delta = self.delta / scale

    @property
    def positions(self) -> int:
        """``L``, the positions of each sample that share the weight."""
        return self.delta.shape[2]

    def _inputs(self, start: int, stop: int) -> Tensor:
        """Return the input factor of samples ``start:stop``, ``[b, L, K]`` (``D = C_out * K``)."""
        raise NotImplementedError

    def _input_elements(self) -> int:
        """Return the elements of one sample's input factor that a block allocates."""
        return 0

    def _decay_term(self) -> Tensor | None:
        """Return the regulariser's gradient ``lambda * theta`` as ``[C_out, K]``, or ``None``."""
        return self.decay * self.theta.reshape(self.weight_shape[0], -1) if self.decay else None

    def data_mean(self) -> Tensor:
        """Return ``sum_i delta_i^T @ x_i``, the mean data-loss gradient ``[C_out, K]``."""
        raise NotImplementedError

    def data_products(self, vector: Tensor) -> Tensor:
        """Return ``delta_i^T @ x_i . U`` for every sample, ``[N]``, with ``U`` the vector as ``[C_out, K]``."""
        raise NotImplementedError

    def products(self, vector: Tensor) -> Tensor:
        """Return ``G[i] . v`` for every sample, ``[N]``, without forming per-sample gradients.

        Args:
            vector: ``v``, flattened ``[D]``.
        """
        products = self.n * self.data_products(vector.reshape(self.weight_shape))
        decay_term = self._decay_term()
        return products if decay_term is None else products + (decay_term.reshape(-1) @ vector)

    def square_norms(self) -> Tensor | None:
        """Return ``||G[i]||^2`` for every sample, ``[N]``, where that needs no blocks, else ``None``.

        With one position per sample (``L = 1``), ``G[i] = N delta_i x_i^T + lambda theta`` and
        ``||G[i]||^2 = N^2 ||delta_i||^2 ||x_i||^2 + 2 N lambda delta_i^T theta x_i + lambda^2 ||theta||^2``.
        """
        if self.positions != 1:
            return None
        squares = self.n**2 * self.delta.square().sum((1, 2)) * self._inputs(0, self.n).square().sum((1, 2))
        decay_term = self._decay_term()
        if decay_term is None:
            return squares
        return squares + 2 * self.n * self.data_products(decay_term) + decay_term.square().sum()

    def second_moment(self) -> Tensor | None:
        """Return ``sum_i G[i]^2`` per coordinate, ``[D]``, where that needs no blocks, else ``None``.

        With one position per sample and no regulariser, ``G[i]_ab = N delta_ia x_ib``, so the
        sum is ``N^2 (delta^2)^T (x^2)``: one matrix product of non-negative numbers, as accurate
        as squaring and summing formed gradients. (A regulariser adds terms that may cancel.)
        """
        factors = self._rank_one_factors()
        if factors is None:
            return None
        scaled, inputs = factors
        return (scaled.square().T @ inputs.square()).reshape(-1)  # (N delta)^2 summed: [C_out * K]

    def _rank_one_factors(self) -> tuple[Tensor, Tensor] | None:
        """Return ``c = N delta`` (``[N, C_out]``) and ``x`` (``[N, K]``) where every ``G[i]`` is
        their outer product ``c_i x_i^T`` (one position per sample, no regulariser), else ``None``."""
        if self.positions != 1 or self.decay:
            return None
        return self.delta[:, :, 0] * self.n, self._inputs(0, self.n)[:, 0, :]  # c as blocks() scales it

    def centered_sum(self, g: Tensor) -> Tensor | None:
        """Return ``sum_i ||G[i] - g||^2`` (float64 scalar) where that needs no blocks, else ``None``.

        With one position per sample (``L = 1``), ``G[i] - g = N delta_i x_i^T + C`` with the
        constant ``C = lambda theta - g`` (``[C_out, K]``), so that

            ``||G[i] - g||^2 = N^2 ||delta_i||^2 ||x_i||^2 + 2 N delta_i^T C x_i + ||C||^2``

        and the middle terms sum to ``2 N <C, M>`` with ``M = sum_i delta_i x_i^T``, the data
        gradient that :meth:`mean` computed: no product over all samples, outputs and inputs.
        The sums are taken in float64, but a float32 ``M`` carries its rounding errors into the
        result, magnified by how far the terms cancel (about ``3e-8`` times the ratio of the
        positive terms to the result, measured). Where they cancel to less than
        ``1 / CANCELLATION_LIMIT`` of their size (per-sample gradients that nearly agree), the
        middle terms are summed over the samples in float64 instead, which is as accurate as
        squaring the differences of formed per-sample gradients.

        Args:
            g: The mean gradient, flattened ``[D]``.
        """
        if self.positions != 1:
            return None
        delta, inputs = self.delta[:, :, 0], self._inputs(0, self.n)[:, 0, :]  # [N, C_out], [N, K]
        data_gradient = self._data_gradient().reshape(self.weight_shape[0], -1)  # M, [C_out, K]
        squares = torch.dot(_square_norms64(delta), _square_norms64(inputs))  # sum_i ||delta_i||^2 ||x_i||^2
        constant_square = crossed = torch.zeros((), dtype=torch.float64, device=delta.device)
        own_mean = self._is_data_gradient(g)  # then C = -M, and the crossed sum <C, M> is -||C||^2, the very value the product gives
        for rows, constant in self._constant_rows(g):  # float64 rows of C, never all of it at once
            flat = constant.reshape(-1)
            constant_square = constant_square + torch.dot(flat, flat)
            if not own_mean:
                crossed = crossed + torch.dot(flat, data_gradient[rows].reshape(-1).double())  # sum_i delta_i^T C x_i
        if own_mean:
            crossed = -constant_square
        positive = self.n**2 * squares + self.n * constant_square
        total = positive + 2 * self.n * crossed
        if data_gradient.dtype != torch.float64 and float(total) * CANCELLATION_LIMIT < float(positive):
            wide_inputs = inputs.double()
            crossed = sum((wide_inputs @ constant.T).mul_(delta[:, rows]).sum() for rows, constant in self._constant_rows(g))
            total = positive + 2 * self.n * crossed
        return total

    def _constant_rows(self, g: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``C = lambda theta - g`` (``[C_out, K]``) in float64 blocks of rows ``[r, K]``
        of about ``WIDE_BLOCK_ELEMENTS`` elements, with their row slices."""
        g = g.reshape(self.weight_shape[0], -1)
        theta = self.theta.reshape(g.shape) if self.decay else None
        step = max(1, WIDE_BLOCK_ELEMENTS // max(g.shape[1], 1))
        for start in range(0, g.shape[0], step):
            rows = slice(start, start + step)
            constant = -g[rows].double()
            yield rows, constant if theta is None else constant.add_(theta[rows], alpha=self.decay)

    def _is_data_gradient(self, vector: Tensor) -> bool:
        """Whether ``vector`` is this layer's data gradient ``M`` itself, as the mean gradient is
        without a regulariser in one process (the same memory, not merely equal values)."""
        data_mean = self._data_mean
        return data_mean is not None and vector.data_ptr() == data_mean.data_ptr() and vector.numel() == data_mean.numel()

    def _data_gradient(self) -> Tensor:
        """Return :meth:`data_mean`, computed once per source."""
        if self._data_mean is None:
            self._data_mean = self.data_mean()
        return self._data_mean

    def take_mean(self, g: Tensor) -> None:
        """Use ``g`` (``[D]``: the training's own gradient of the weight, which the backward pass
        forms anyway) as the mean, so that it is not formed a second time from the factors (a
        matrix product as large as the weight gradient's, and a temporary of the weight's size)."""
        self._mean = g.reshape(-1)
        decay_term = self._decay_term()
        data_mean = self._mean.reshape(self.weight_shape[0], -1)
        self._data_mean = data_mean if decay_term is None else data_mean - decay_term

    def mean(self) -> Tensor:
        """Return ``g = mean_i G[i]``, ``[D]``, without forming per-sample gradients."""
        if self._mean is not None:
            return self._mean
        mean = self._data_gradient().reshape(self.weight_shape[0], -1)
        decay_term = self._decay_term()
        return (mean if decay_term is None else mean + decay_term).reshape(-1)

    def histogram(self, spec: HistogramSpec) -> Tensor | None:
        """Return the counts ``[spec.bins + 1]`` of all elements of ``G`` (the last slot: NaN),
        forming only the rows of products that may span several bins (:mod:`outer_histogram`);
        ``None`` where the factors do not allow it (several positions per sample, a regulariser's
        gradient) or where forming every element is cheaper.

        Args:
            spec: The histogram axis.
        """
        factors = self._rank_one_factors()
        return None if factors is None else outer_histogram(*factors, spec)

    def joint_histogram(self, fine: HistogramSpec, columns: Tensor, width: int) -> Tensor | None:
        """Return the joint counts of (fine gradient bin, parameter column) of all elements of ``G``
        in the layout of :func:`sample_pass._joint_counts`, forming only the rows that may span
        several bins (:func:`outer_histogram.outer_joint_histogram`); ``None`` where
        :meth:`histogram` would be.

        Args:
            fine: The gradient axis.
            columns: The parameter-axis bin of each element, ``[D]`` (int32; NaN -> ``width``).
            width: Parameter-axis bins.
        """
        factors = self._rank_one_factors()
        return None if factors is None else outer_joint_histogram(*factors, fine, columns, width)

    def blocks(self) -> Iterator[Tensor]:
        """Yield ``G`` in blocks of samples ``[b, D]``, each of about :data:`row_blocks.CHUNK_ELEMENTS` elements."""
        size = self.weight_shape.numel()
        rows = max(1, row_blocks.CHUNK_ELEMENTS // (size + self._input_elements()))
        decay_term = self._decay_term()
        scale_first = self.delta.shape[2] * self.weight_shape[0] <= size  # delta's block is the smaller: scale it by N
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            delta = self.delta[start:stop]  # [b, C_out, L]
            inputs = self._inputs(start, stop)  # [b, L, K]
            block = _outer(delta * self.n, inputs) if scale_first else _outer(delta, inputs).mul_(self.n)
            if decay_term is not None:
                block.add_(decay_term)
            block = block.reshape(stop - start, size)
            yield block
            del block  # held no longer than the caller holds it, not while the next one is formed


def _outer(delta: Tensor, inputs: Tensor) -> Tensor:
    """Return ``delta @ inputs`` for ``[b, C_out, L]`` and ``[b, L, K]``: ``[b, C_out, K]``.

    With one position (``L = 1``) each element is a single product, which broadcasting forms
    faster than a batched matrix product (and to the same bits).
    """
    return delta * inputs if delta.shape[2] == 1 else torch.bmm(delta, inputs)


class FactoredLinear(FactoredSamples):
    """Per-sample weight gradients of ``nn.Linear`` from its inputs ``[N, *, in]`` and output gradients ``[N, *, out]``."""

    def __init__(self, inputs: Tensor, grad_outputs: Tensor, weight_shape: torch.Size):
        n, out_features = grad_outputs.shape[0], grad_outputs.shape[-1]
        super().__init__(grad_outputs.reshape(n, -1, out_features).transpose(1, 2), weight_shape)  # [N, out, L]
        self.x = inputs.reshape(n, -1, inputs.shape[-1])  # [N, L, in]

    def _inputs(self, start: int, stop: int) -> Tensor:
        return self.x[start:stop]

    def data_mean(self) -> Tensor:
        delta = self.delta.transpose(1, 2).reshape(-1, self.delta.shape[1])  # [N * L, out]
        return delta.T @ self.x.reshape(-1, self.x.shape[-1])

    def data_products(self, vector: Tensor) -> Tensor:
        if self._gram_pays(vector):
            delta, inputs = self.delta[:, :, 0], self.x[:, 0, :]  # [N, out], [N, in]
            return (delta @ delta.T).mul_(inputs @ inputs.T).sum(1)
        outputs = self.x @ vector.T  # [N, L, out]: the layer's output with the vector as its weight
        return outputs.mul_(self.delta.transpose(1, 2)).sum((1, 2))  # in place: one temporary of the output's size

    def _gram_pays(self, vector: Tensor) -> bool:
        """Whether to take the products with ``vector`` from the samples' Gram matrices.

        Where ``vector`` is this layer's own data gradient ``M = sum_j delta_j x_j^T`` (the mean
        gradient without a regulariser, in one process) and each sample has one position,
        ``delta_i^T M x_i = sum_j (delta_i . delta_j) (x_i . x_j)``: two ``[N, N]`` products,
        ``N^2 (out + in)`` multiplications instead of ``N out in``. Taken where that is under half
        (wide layers: 784 -> 1000 with 128 samples, 0.6 ms instead of 2.1 ms); equal up to float32
        rounding, both being sums of the same products in another order.
        """
        out_features, in_features = self.weight_shape
        cheaper = 2 * self.n * (out_features + in_features) < out_features * in_features
        return cheaper and self.delta.shape[2] == 1 and self._is_data_gradient(vector)


class FactoredEmbedding(FactoredLinear):
    """Per-sample weight gradients of ``nn.Embedding`` (``[V, D]``) from its ids ``[N, *]`` and
    output gradients ``[N, *, D]``: those of a Linear layer whose output-side factor is the ids
    one-hot, ``G[i] = N sum_l e_(id_il) delta_il^T``, none at ``padding_idx``.

    Sample ``i``'s gradient is the regulariser's ``lambda theta`` but in the rows of the ids it
    holds: the mean, the products with a vector, the squared norms, the second moment, the
    centred sum and the histograms come from those rows alone (:meth:`_touched`, at most ``L D``
    numbers per sample) and the regulariser's rows counted once for the samples that leave them
    untouched, where forming every sample's gradient of the table takes ``N V D``. The one-hot
    factor (``delta``, ``[N, V, L]``) is formed only for the runs of a tied weight
    (:class:`StackedPositions`); the blocks are formed only for the statistics without a formula
    here (the adaptive histogram range, the per-coordinate centred sums).
    """

    def __init__(self, ids: Tensor, grad_outputs: Tensor, vocabulary: int, padding_idx: int | None):
        n, width = len(grad_outputs), grad_outputs.shape[-1]
        self.ids = ids.reshape(n, -1)  # [N, L]
        self.padding_idx = padding_idx
        self._one_hot: Tensor | None = None
        FactoredSamples.__init__(self, grad_outputs, torch.Size((vocabulary, width)))  # (delta is formed on demand)
        self.x = grad_outputs.reshape(n, -1, width)  # [N, L, D]
        self.kept = None if padding_idx is None else (self.ids != padding_idx).unsqueeze(-1)  # [N, L, 1]
        self._rows_of_samples: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def delta(self) -> Tensor:
        """The ids one-hot, ``[N, V, L]``, zero at ``padding_idx`` (whose row gets no gradient)."""
        if self._one_hot is None:
            one_hot = torch.zeros(*self.ids.shape, self.weight_shape[0], dtype=self.x.dtype, device=self.x.device)
            one_hot.scatter_(2, self.ids.unsqueeze(2), 1.0)
            if self.padding_idx is not None:
                one_hot[..., self.padding_idx] = 0
            self._one_hot = one_hot.transpose(1, 2)
        return self._one_hot

    @delta.setter
    def delta(self, value: Tensor) -> None:
        self._one_hot = None  # (FactoredSamples sets its output gradients here; the one-hot is formed from the ids)

    def unscale(self, scale: float) -> None:
        self.x = self.x / scale  # the output gradients (the one-hot factor stays as it is)
        self._rows_of_samples = None

    def _rows(self, start: int, stop: int) -> Tensor:
        """Return the output gradients of samples ``start:stop``, zero at padding: ``[b, L, D]``."""
        rows = self.x[start:stop]
        return rows if self.kept is None else rows * self.kept[start:stop]

    def data_mean(self) -> Tensor:
        width = self.x.shape[-1]
        return torch.zeros(self.weight_shape, dtype=self.x.dtype, device=self.x.device).index_add_(0, self.ids.reshape(-1), self._rows(0, self.n).reshape(-1, width))

    def data_products(self, vector: Tensor) -> Tensor:
        return (vector[self.ids] * self._rows(0, self.n)).sum((1, 2))  # delta_il . U[id_il]

    def blocks(self) -> Iterator[Tensor]:
        vocabulary, width = self.weight_shape
        size = self.weight_shape.numel()
        rows = max(1, row_blocks.CHUNK_ELEMENTS // size)
        decay_term = self._decay_term()
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            offsets = torch.arange(stop - start, device=self.ids.device).unsqueeze(1) * vocabulary  # each sample's rows of the block
            block = torch.zeros((stop - start) * vocabulary, width, dtype=self.x.dtype, device=self.x.device)
            block.index_add_(0, (self.ids[start:stop] + offsets).reshape(-1), self._rows(start, stop).reshape(-1, width)).mul_(self.n)
            block = block.reshape(stop - start, vocabulary, width)
            if decay_term is not None:
                block.add_(decay_term)
            block = block.reshape(stop - start, size)
            yield block
            del block

    def _touched(self) -> tuple[Tensor, Tensor, Tensor]:
        """Return the rows the samples' ids touch, each (sample, id) pair once (``P`` of them):
        the pairs' samples ``[P]`` and ids ``[P]`` and those rows of the samples' gradients
        ``G[i, v] = N sum_(l: id_il = v) delta_il + lambda theta_v``, ``[P, D]`` (no padding)."""
        if self._rows_of_samples is None:
            vocabulary, width = self.weight_shape
            keys = torch.arange(self.n, device=self.ids.device).unsqueeze(1) * vocabulary + self.ids  # [N, L]
            rows = self.x
            if self.kept is not None:
                kept = self.kept.squeeze(-1)
                keys, rows = keys[kept], rows[kept]
            pairs, pair_of = torch.unique(keys.reshape(-1), return_inverse=True)
            values = torch.zeros(len(pairs), width, dtype=self.x.dtype, device=self.x.device)
            values.index_add_(0, pair_of, rows.reshape(-1, width)).mul_(self.n)  # as blocks() forms them
            ids = pairs % vocabulary
            decay_term = self._decay_term()
            if decay_term is not None:
                values.add_(decay_term[ids])
            self._rows_of_samples = (pairs // vocabulary, ids, values)
        return self._rows_of_samples

    def _untouched(self) -> Tensor:
        """Return how many samples leave each row untouched, ``[V]`` (int64): their gradient there is
        the regulariser's."""
        _, ids, _ = self._touched()
        return self.n - torch.bincount(ids, minlength=self.weight_shape[0])

    def square_norms(self) -> Tensor:
        samples, ids, values = self._touched()
        norms = torch.zeros(self.n, dtype=values.dtype, device=values.device).index_add_(0, samples, values.square().sum(1))
        decay_term = self._decay_term()
        if decay_term is None:
            return norms
        rows = decay_term.square().sum(1)  # ||lambda theta_v||^2, [V]
        return norms + (rows.sum() - torch.zeros_like(norms).index_add_(0, samples, rows[ids]))

    def second_moment(self) -> Tensor:
        _, ids, values = self._touched()
        moment = torch.zeros(self.weight_shape, dtype=values.dtype, device=values.device).index_add_(0, ids, values.square())
        decay_term = self._decay_term()
        if decay_term is not None:
            moment.addcmul_(self._untouched().to(values.dtype).unsqueeze(1), decay_term.square())
        return moment.reshape(-1)

    def centered_sum(self, g: Tensor) -> Tensor:
        """``sum_i ||G[i] - g||^2`` (float64): the touched rows' deviations, and each untouched row
        ``lambda theta_v - g_v`` as often as samples leave it (no terms that cancel)."""
        _, ids, values = self._touched()
        g = g.reshape(self.weight_shape)
        touched = torch.zeros((), dtype=torch.float64, device=values.device)
        step = max(1, WIDE_BLOCK_ELEMENTS // max(values.shape[1], 1))  # float64 copies of a few pairs at a time
        for part, rows in zip(values.split(step), ids.split(step)):
            deviation = (part - g[rows]).double().reshape(-1)
            touched = touched + torch.dot(deviation, deviation)
        constant = -g if self.decay == 0 else self._decay_term() - g  # [V, D]
        return touched + torch.dot(_square_norms64(constant), self._untouched().double())

    def histogram(self, spec: HistogramSpec) -> Tensor:
        _, _, values = self._touched()
        counts = spec.counts_of(values)
        if self.decay == 0:  # every untouched element is 0
            counts[spec.bin_of(values.new_zeros(1)).long()] += self._untouched().sum() * self.weight_shape[1]
            return counts
        return counts + self._untouched_counts(spec, lambda bins, rows: bins, spec.bins + 1)

    def joint_histogram(self, fine: HistogramSpec, columns: Tensor, width: int) -> Tensor:
        _, ids, values = self._touched()
        cells = columns.reshape(self.weight_shape)  # [V, D]
        size = (fine.bins + 1) * (width + 1)
        counts = torch.bincount(fine.bin_of(values).mul_(width + 1).add_(cells[ids]).reshape(-1), minlength=size)
        return counts + self._untouched_counts(fine, lambda bins, rows: bins.mul_(width + 1).add_(cells[rows]), size)

    def _untouched_counts(self, spec: HistogramSpec, cell_of: Callable[[Tensor, slice], Tensor], size: int) -> Tensor:
        """Return the counts over ``size`` cells of the untouched rows' elements, ``lambda theta``
        (or 0), each as often as samples leave its row, a block of rows at a time: ``cell_of``
        maps the bins of rows ``rows`` (``[r, D]``) to their cells."""
        untouched = self._untouched().double()
        decay_term = self._decay_term()
        width = self.weight_shape[1]
        counts = torch.zeros(size, dtype=torch.float64, device=self.x.device)
        step = max(1, row_blocks.CHUNK_ELEMENTS // width)
        for start in range(0, self.weight_shape[0], step):
            rows = slice(start, start + step)
            values = decay_term[rows] if decay_term is not None else self.x.new_zeros(untouched[rows].shape[0], width)
            cells = cell_of(spec.bin_of(values, dtype=torch.int64), rows)
            counts += torch.bincount(cells.reshape(-1), weights=untouched[rows].unsqueeze(1).expand(cells.shape).reshape(-1), minlength=size)
        return counts.round_().long()  # exact: whole numbers far below 2^53


def factorable_embedding(module: nn.Embedding) -> bool:
    """Whether :func:`embedding_samples` gives the layer's per-sample gradients: not for one that
    renormalises its rows (``max_norm``) or whose gradients are sparse or scaled by counts."""
    return module.max_norm is None and not module.sparse and not module.scale_grad_by_freq


def embedding_samples(module: nn.Embedding, ids: Tensor, grad_output: Tensor) -> FactoredEmbedding:
    """The per-sample weight gradients of an Embedding from its ids ``[N, *]`` and its output's
    gradient ``[N, *, D]`` (in the weight's precision)."""
    return FactoredEmbedding(ids, grad_output, module.num_embeddings, module.padding_idx)


class FactoredConv(FactoredSamples):
    """Per-sample weight gradients of ``nn.Conv1d`` / ``nn.Conv2d`` (one group, :func:`~convolutions.unfoldable`).

    Args:
        module: The convolution.
        grad_outputs: Output gradients ``[N, C_out, *spatial_out]``.
        inputs: Its input ``[N, C_in, *spatial]`` (default: BackPACK's stored ``module.input0``).
    """

    def __init__(self, module: nn.Conv1d | nn.Conv2d, grad_outputs: Tensor, inputs: Tensor | None = None):
        super().__init__(grad_outputs.reshape(grad_outputs.shape[0], grad_outputs.shape[1], -1), module.weight.shape)
        self.module = module
        self.inputs = module.input0 if inputs is None else inputs
        self.grad_outputs = grad_outputs

    def unscale(self, scale: float) -> None:
        self.grad_outputs = self.grad_outputs / scale
        self.delta = self.grad_outputs.reshape(self.delta.shape)

    def _inputs(self, start: int, stop: int) -> Tensor:
        return unfold(self.module, self.inputs[start:stop]).transpose(1, 2)  # [b, L, K]

    def _input_elements(self) -> int:
        return self.weight_shape[1:].numel() * self.delta.shape[2]  # K * L

    def data_mean(self) -> Tensor:
        m = self.module
        weight_gradient = torch.nn.grad.conv1d_weight if isinstance(m, nn.Conv1d) else torch.nn.grad.conv2d_weight
        return weight_gradient(padded(m, self.inputs), self.weight_shape, self.grad_outputs, m.stride, zero_padding(m), m.dilation, m.groups)

    def data_products(self, vector: Tensor) -> Tensor:
        m = self.module
        convolution = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
        outputs = convolution(padded(m, self.inputs), vector, None, m.stride, zero_padding(m), m.dilation, m.groups)  # [N, C_out, *spatial_out]
        return outputs.mul_(self.grad_outputs).sum(tuple(range(1, outputs.dim())))  # in place: one temporary of the output's size


class StackedPositions(FactoredSamples):
    """Per-sample weight gradients of a weight that several layer runs share: a layer applied more
    than once in a forward pass, or layers that share the weight.

    Each run adds its positions' products to every sample's gradient, so ``G[i]`` is one product
    of factors with all the runs' positions side by side:
    ``G[i] = N * sum_r delta_i^(r)T @ x_i^(r) = N * [delta_i^(1) ... delta_i^(R)]^T @ [x_i^(1); ...; x_i^(R)]``.

    Args:
        runs: The sources of the single runs (of the same weight, regulariser not included).
    """

    def __init__(self, runs: list[FactoredSamples]):
        super().__init__(torch.cat([run.delta for run in runs], dim=2), runs[0].weight_shape)  # [N, C_out, sum L]
        self.runs = runs

    def unscale(self, scale: float) -> None:
        for run in self.runs:
            run.unscale(scale)
        self.delta = self.delta / scale

    def _inputs(self, start: int, stop: int) -> Tensor:
        return torch.cat([run._inputs(start, stop) for run in self.runs], dim=1)  # [b, sum L, K]

    def _input_elements(self) -> int:
        return self.weight_shape[1:].numel() * self.delta.shape[2]  # every block's inputs are stacked anew

    def data_mean(self) -> Tensor:
        return sum(run.data_mean() for run in self.runs)

    def data_products(self, vector: Tensor) -> Tensor:
        return sum(run.data_products(vector) for run in self.runs)


def _square_norms64(matrix: Tensor) -> Tensor:
    """Return the squared norm of each row of ``[N, C]``, ``[N]``, squared and summed in float64
    a block of rows at a time (at most about ``WIDE_BLOCK_ELEMENTS`` float64 numbers at once)."""
    rows = max(1, WIDE_BLOCK_ELEMENTS // max(matrix.shape[1], 1))
    return torch.cat([block.double().square().sum(1) for block in matrix.split(rows)])
