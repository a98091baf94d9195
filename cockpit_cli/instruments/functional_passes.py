"""Extra passes over a batch that quantities borrow: ``torch.func`` per-sample gradients for models
BackPACK cannot extend, Hessian-vector products, and forward-mode per-sample slopes.

Each pass that runs the model again replays the random state of the training's forward pass,
so that dropout draws the same masks, and never advances the training's own random state.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_map

from cockpit_cli.instruments.batch_inputs import Inputs, batch_size, call_model, first_input, model_args, model_kwargs
from cockpit_cli.instruments.per_sample_loss import PerSampleLoss, one_per_sample
from cockpit_cli.instruments.sync import Synchronizer
from cockpit_cli.instruments.torch_notices import quiet_notices


# Rows of the batch's Jacobian that one vmapped backward pass forms: each row's pass holds the
# batch's backward intermediates, so all N rows at once would hold N times them (a GRU of 128
# units over 32 steps, batch 128: 1.5 s unchunked, 1.0 s in rows of 16).
JACOBIAN_ROWS = 16


def functorch_per_sample(
    model: nn.Module,
    named_params: dict[str, Tensor],
    per_sample_loss: PerSampleLoss,
    inputs: Inputs,
    targets: Any,
    rng_state: tuple | None,
    by_jacobian: bool = False,
) -> dict[str, Tensor]:
    """Return per-sample data-loss gradients from ``torch.func``, ``[N, *p.shape]`` per parameter name.

    Without dropout: ``vmap(grad(...))`` over samples. With dropout in training mode, or where
    asked (``by_jacobian``: a model that ``vmap`` cannot run one sample at a time, such as
    ``nn.GRU``, whose hidden state starts unbatched and is changed in place), the Jacobian of the
    per-sample losses of one forward pass on the whole batch that replays the training
    forward's random state, so every sample sees the mask it was trained with (row i is g_i, as
    samples do not interact; ``vmap`` then runs only the backward passes).

    Args:
        model: The network.
        named_params: The tracked parameters by name (detached).
        per_sample_loss: ``(outputs, targets) -> [N]`` data losses.
        inputs: The batch ``[N, ...]``, or a tuple of the model's inputs (:mod:`batch_inputs`).
        targets: Its targets ``[N, ...]`` (or a tuple of such tensors).
        rng_state: The random state right before the training forward (:func:`capture_rng_state`).
        by_jacobian: Take the Jacobian of the batch's losses also without dropout.
    """

    def sample_loss(theta: dict[str, Tensor], x: tuple[Tensor, ...], keywords: dict[str, Tensor], y: Any) -> Tensor:
        outputs = functional_call(model, theta, tree_map(_as_batch_of_one, x), tree_map(_as_batch_of_one, keywords))
        return one_per_sample(per_sample_loss(outputs, tree_map(_as_batch_of_one, y)), 1).sum()

    def batch_losses(theta: dict[str, Tensor]) -> Tensor:
        return one_per_sample(per_sample_loss(functional_call(model, theta, model_args(inputs), model_kwargs(inputs)), targets), batch_size(inputs))

    # (with grad mode on: a caller under no_grad would have fused kernels, an LSTM's on the CPU, run
    # without what their backward pass needs)
    with torch.random.fork_rng(devices=devices(first_input(inputs))), quiet_notices(), unchanged_state(model), torch.enable_grad():
        if by_jacobian or _has_dropout(model):
            if rng_state is not None:
                _set_rng_state(rng_state)
            return jacrev(batch_losses, chunk_size=JACOBIAN_ROWS)(named_params)
        return vmap(grad(sample_loss), in_dims=(None, 0, 0, 0), randomness="different")(named_params, model_args(inputs), model_kwargs(inputs), targets)


def no_second_derivative(error: str) -> bool:
    """Whether ``error`` (``"Type: message"`` or a message) is torch's word for an operation whose
    backward has no derivative."""
    return "derivative for" in error and "is not implemented" in error


def fused_attention_without_second_derivative(error: str) -> bool:
    """Whether ``error`` is :func:`no_second_derivative` for attention's fused kernel (the math
    kernel has a second derivative)."""
    return no_second_derivative(error) and "scaled_dot_product" in error


def hessian_vector_product(loss: Tensor, params: list[nn.Parameter], sync: Synchronizer, gradient_scale: float = 1.0) -> Callable[[list[Tensor]], list[Tensor]]:
    """Return ``v -> H v`` for the Hessian of ``loss`` (its graph must still exist).

    The products differentiate the gradients ``p.grad`` where the backward pass left them
    differentiable (``create_graph``; those of ``gradient_scale * loss``, divided again), else
    gradients taken again with a graph. With data-parallel processes, ``loss`` is the local
    shard's mean loss and the product is the mean of the shards' products: the global batch's
    Hessian times ``v``.
    """
    gradients = [p.grad for p in params]
    if not all(g is not None and g.grad_fn is not None for g in gradients):
        # allow_unused: a parameter the loss does not use (a layer the forward pass skips) has a
        # zero gradient and zero rows and columns in the Hessian
        with quiet_notices():
            gradients = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        gradient_scale = 1.0
    # Only gradients that depend on the parameters have a Hessian part: a gradient that is
    # None or constant (a layer that is skipped, or whose output enters the loss linearly
    # without any parameter after it) has none.
    curved = [i for i, g in enumerate(gradients) if g is not None and g.grad_fn is not None]
    world = sync.world_size
    # The gradients of the scaled loss are differentiated along v / sqrt(scale) (a power of two,
    # which rounds nothing): the pass's half-precision numbers then lie between those of the
    # loss and those of the scaled loss, where a gradient scaler keeps the gradients just below
    # overflow.
    along = 2.0 ** -round(math.log2(gradient_scale) / 2)

    def scaled(vectors: list[Tensor | None], factor: float) -> list[Tensor | None]:
        return vectors if factor == 1.0 else [None if v is None else v * factor for v in vectors]

    def product(vector: list[Tensor], batched: bool = False) -> list[Tensor]:
        """``H v``; with ``batched``, each ``vector[i]`` is ``[B, *p.shape]``, ``B`` vectors at once."""
        parts = [None] * len(params)
        if curved:
            with quiet_notices():  # the graph passes BackPACK's hooks again
                parts = torch.autograd.grad(
                    [gradients[i] for i in curved],
                    params,
                    grad_outputs=scaled([vector[i] for i in curved], along),
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            parts = scaled(list(parts), 1.0 / (gradient_scale * along))
        leading = vector[0].shape[:1] if batched else ()
        local = [torch.zeros(*leading, *p.shape, dtype=p.dtype, device=p.device) if h is None else h for p, h in zip(params, parts)]
        return local if world == 1 else [sync.sum(h) / world for h in local]

    return product


def loss_at(
    model: nn.Module, loss_function: Any, inputs: Inputs, targets: Any, rng_state: tuple | None, named_theta: dict[str, Tensor] | None = None, weight: float = 1.0
) -> Tensor:
    """Return ``weight`` times ``loss_function`` of the outputs of ``model`` on the step's batch
    again, in the random state of its forward pass (its dropout masks), with a graph through the
    layers (their hooks see the pass): with its own parameters, or with ``named_theta`` in their
    place (which must then require gradients)."""
    with torch.random.fork_rng(devices=devices(first_input(inputs))), torch.enable_grad(), unchanged_state(model):
        if rng_state is not None:
            _set_rng_state(rng_state)
        outputs = call_model(model, inputs) if named_theta is None else functional_call(model, named_theta, model_args(inputs), model_kwargs(inputs))
        loss = loss_function(outputs, targets)
        return loss if weight == 1.0 else weight * loss


def per_sample_slopes(
    model: nn.Module,
    named_theta: dict[str, Tensor],
    per_sample_loss: PerSampleLoss,
    weight_decay: list[float],
    sync: Synchronizer,
    inputs: Inputs,
    targets: Any,
    rng_state: tuple | None,
) -> Callable[[list[Tensor]], Tensor]:
    """Return ``d -> [N]`` (float64), each sample's directional derivative ``g_i . d`` at ``theta``.

    One forward-mode pass on the batch per call, the regulariser's ``sum_p lambda_p theta_p . d_p``
    added to every sample; data-parallel shards are gathered.

    Args:
        model: The network.
        named_theta: The point ``theta`` by parameter name, in the order of ``weight_decay``.
        per_sample_loss: ``(outputs, targets) -> [N]`` data losses.
        weight_decay: Per parameter, the L2 factor lambda of the regulariser.
        sync: Combines the shards of data-parallel processes.
        inputs: The batch ``[N, ...]``, or a tuple of the model's inputs (:mod:`batch_inputs`).
        targets: Its targets ``[N, ...]`` (or a tuple of such tensors).
        rng_state: The random state right before the training forward, restored for the pass.
    """

    def slopes(direction: list[Tensor]) -> Tensor:
        with torch.random.fork_rng(devices=devices(first_input(inputs))), torch.no_grad(), quiet_notices(), forward_ad.dual_level(), unchanged_state(model):
            if rng_state is not None:
                _set_rng_state(rng_state)
            duals = {name: forward_ad.make_dual(t, d.to(t.dtype)) for (name, t), d in zip(named_theta.items(), direction)}
            losses = one_per_sample(per_sample_loss(functional_call(model, duals, model_args(inputs), model_kwargs(inputs)), targets), batch_size(inputs))
            tangent = forward_ad.unpack_dual(losses).tangent
        return sync.gather(tangent.detach().double() + regularizer_slope(list(named_theta.values()), direction, weight_decay))

    return slopes


def regularizer_slope(theta: list[Tensor], direction: list[Tensor], weight_decay: list[float]) -> float:
    """Return the regulariser's directional derivative ``sum_p lambda_p theta_p . d_p``, the same
    for every sample."""
    return sum(wd * float((t.double() * d.double()).sum()) for t, d, wd in zip(theta, direction, weight_decay) if wd)


def capture_rng_state(device: torch.device) -> tuple:
    """Return the CPU (and, on CUDA, the device's) random state."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextmanager
def unchanged_state(model: nn.Module) -> Iterator[None]:
    """Run one of the instruments' own passes of ``model`` without moving its state on.

    A spectral norm's power iteration holds still: its parametrization computes in eval mode,
    from the vectors the training's forward pass left, as that pass did after updating them (so
    the pass sees the training's weights). A buffer the pass changes all the same (batch norm's
    running statistics in training mode) gets its value back as a new tensor, so that a graph
    of the pass that saved the changed one stays valid.
    """
    held = [m for m in model.modules() if type(m).__name__ == "_SpectralNorm" and m.training]
    moving = [m for m in model.modules() if m.training]  # (a layer in eval mode keeps its buffers as they are)
    buffers = [(m, name, b, b.detach().clone()) for m in moving for name, b in m._buffers.items() if isinstance(b, Tensor)]
    for module in held:
        module.training = False
    try:
        yield
    finally:
        for module in held:
            module.training = True
        for module, name, buffer, value in buffers:  # (kernels that update statistics in place leave no version behind)
            if module._buffers.get(name) is buffer and not torch.equal(buffer, value):
                module._buffers[name] = value


def _has_dropout(model: nn.Module) -> bool:
    """Return whether a dropout layer of ``model`` draws masks (training mode, p > 0)."""
    return any(isinstance(m, _DropoutNd) and m.training and m.p > 0 for m in model.modules())


def _as_batch_of_one(value: Any) -> Any:
    """Give one sample's tensor (inside ``vmap``) its batch dimension back; other values stay."""
    return value.unsqueeze(0) if isinstance(value, Tensor) else value


def devices(tensor: Tensor) -> list[int]:
    """Return the CUDA devices whose random state a pass on ``tensor`` uses (``fork_rng``'s ``devices``)."""
    return [tensor.device.index or 0] if tensor.device.type == "cuda" else []


PRODUCTS_AT_ONCE = 64  # Hessian-vector products batched in one pass (a diagonal from products)


def diagonal_by_products(like: Tensor, applied: Callable[[Tensor], Tensor]) -> Tensor:
    """Return the diagonal ``(A e_k)_k`` of a linear map ``A`` on tensors shaped like ``like``,
    every entry ``k``, shaped like ``like``: ``applied`` maps a block of unit vectors
    ``[b, *like.shape]`` to ``A`` of each (``[b, *like.shape]``), :data:`PRODUCTS_AT_ONCE` at a time."""
    size = like.numel()
    diagonal = torch.empty(size, dtype=like.dtype, device=like.device)
    for start in range(0, size, PRODUCTS_AT_ONCE):
        entries = torch.arange(start, min(start + PRODUCTS_AT_ONCE, size), device=like.device)
        rows = torch.arange(len(entries), device=like.device)
        units = torch.zeros(len(entries), size, dtype=like.dtype, device=like.device)
        units[rows, entries] = 1
        diagonal[entries] = applied(units.view(len(entries), *like.shape)).reshape(len(entries), size)[rows, entries]
    return diagonal.view_as(like)
