"""Small networks for MNIST-1D (signals ``[N, 40]``, 10 classes), built from BackPACK-supported layers.

Both are ``nn.Sequential`` of ``Linear``, ``Conv1d``, activations, ``Unflatten`` and ``Flatten``
only, so BackPACK can extend every layer. Their activation, size and initial weight scale are
parameters, so that training failures (saturating sigmoids, tiny or huge initial weights, very
deep stacks) can be provoked on purpose.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Activation = Literal["relu", "sigmoid", "tanh", "leaky_relu"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}

INPUT_LENGTH = 40
NUM_CLASSES = 10
KERNEL_SIZE = 5


def mlp(depth: int, width: int, activation: Activation = "relu", init_scale: float = 1.0) -> nn.Sequential:
    """Build an MLP ``40 -> width (x depth) -> 10``.

    Args:
        depth: Number of hidden layers, each ``Linear`` followed by the activation.
        width: Units per hidden layer.
        activation: Name of the activation (a key of :data:`ACTIVATIONS`).
        init_scale: Factor applied to PyTorch's default initial weights (biases unchanged).

    Returns:
        Network mapping ``[N, 40]`` to logits ``[N, 10]``.
    """
    layers: list[nn.Module] = []
    features = INPUT_LENGTH
    for _ in range(depth):
        layers += [nn.Linear(features, width), ACTIVATIONS[activation]()]
        features = width
    layers.append(nn.Linear(features, NUM_CLASSES))
    return scale_initial_weights(nn.Sequential(*layers), init_scale)


def cnn(depth: int, width: int, activation: Activation = "relu", init_scale: float = 1.0) -> nn.Sequential:
    """Build a 1-D CNN: ``depth`` strided convolutions of ``width`` channels, then a linear head.

    Each convolution has kernel 5, padding 2 and stride 2, halving the length (40 -> 20 -> 10 -> 5
    for ``depth = 3``).

    Args:
        depth: Number of ``Conv1d`` layers, each followed by the activation.
        width: Channels of every convolution.
        activation: Name of the activation (a key of :data:`ACTIVATIONS`).
        init_scale: Factor applied to PyTorch's default initial weights (biases unchanged).

    Returns:
        Network mapping ``[N, 40]`` to logits ``[N, 10]``.
    """
    layers: list[nn.Module] = [nn.Unflatten(1, (1, INPUT_LENGTH))]
    channels, length = 1, INPUT_LENGTH
    for _ in range(depth):
        layers += [nn.Conv1d(channels, width, KERNEL_SIZE, stride=2, padding=KERNEL_SIZE // 2), ACTIVATIONS[activation]()]
        channels, length = width, (length - 1) // 2 + 1
    layers += [nn.Flatten(), nn.Linear(channels * length, NUM_CLASSES)]
    return scale_initial_weights(nn.Sequential(*layers), init_scale)


def scale_initial_weights(net: nn.Module, factor: float) -> nn.Module:
    """Multiply the weights of every ``Linear`` and ``Conv1d`` layer of ``net`` by ``factor``, in place."""
    if factor != 1.0:
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d)):
                    module.weight.mul_(factor)
    return net
