"""DeepOBS's plain convolutional networks: 2c2d, 3c3d and All-CNN-C.

DeepOBS took these networks from TensorFlow, whose ``"same"`` padding may put one more row and
column of zeros at the bottom and right than at the top and left. Every network here has a fixed
input size, so the padding is computed once while the network is built: symmetric padding goes
into the layer itself, asymmetric padding becomes an explicit ``nn.ZeroPad2d`` in front of it.
The result is a plain ``nn.Sequential`` of layers that BackPACK can extend.

Zero padding in front of a max-pool is only equivalent to TensorFlow's (which ignores the padded
positions) when the inputs are non-negative; in all networks here the pool follows a ReLU.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

Padding4 = tuple[int, int, int, int]


def tf_same_padding(size: int, kernel: int, stride: int) -> Padding4:
    """Return TensorFlow's ``"same"`` padding for a square input.

    Args:
        size: Height (= width) of the input.
        kernel: Kernel height (= width).
        stride: Stride in both directions.

    Returns:
        ``(left, right, top, bottom)`` as ``nn.ZeroPad2d`` expects; the output then has
        ``ceil(size / stride)`` rows and columns.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before = total // 2
    return (before, total - before, before, total - before)


def padded(layer: nn.Module, padding: Padding4) -> list[nn.Module]:
    """Return ``[layer]`` with zero padding: inside the layer if symmetric, else in front.

    Args:
        layer: An ``nn.Conv2d`` or ``nn.MaxPool2d`` built with ``padding=0``.
        padding: ``(left, right, top, bottom)``.
    """
    left, right, top, bottom = padding
    if left == right == top == bottom:
        if left:
            layer.padding = (left, left)
        return [layer]
    return [nn.ZeroPad2d(padding), layer]


def conv_same(
    in_channels: int, out_channels: int, kernel: int, size: int, stride: int = 1, bias: bool = True
) -> list[nn.Module]:
    """A convolution with TensorFlow's ``"same"`` padding on a ``size x size`` input.

    Returns:
        The layers; they map ``[N, in_channels, size, size]`` to
        ``[N, out_channels, ceil(size / stride), ceil(size / stride)]``.
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, bias=bias)
    return padded(conv, tf_same_padding(size, kernel, stride))


def maxpool_same(kernel: int, stride: int, size: int) -> list[nn.Module]:
    """A max-pool with TensorFlow's ``"same"`` padding on a ``size x size`` (non-negative) input."""
    return padded(nn.MaxPool2d(kernel, stride), tf_same_padding(size, kernel, stride))


def _sequential(named_layers: list[tuple[str, nn.Module | list[nn.Module]]]) -> nn.Sequential:
    """Flatten ``(name, layer or [pad, layer])`` pairs into one named ``nn.Sequential``."""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for name, layers in named_layers:
        layers = layers if isinstance(layers, list) else [layers]
        if len(layers) == 2:
            modules[f"{name}_pad"] = layers[0]
        modules[name] = layers[-1]
    return nn.Sequential(modules)


def conv_2c2d(num_outputs: int = 10) -> nn.Sequential:
    """DeepOBS's 2c2d for 28x28 grey images.

    conv 32 5x5 same, ReLU, max-pool 2; conv 64 5x5 same, ReLU, max-pool 2; dense 1024, ReLU;
    dense ``num_outputs``. Weights truncated normal (std 0.05, cut at 2 std), biases 0.05.

    Input ``[N, 1, 28, 28]``; output logits ``[N, num_outputs]``.
    """
    net = _sequential([
        ("conv1", conv_same(1, 32, 5, size=28)),
        ("relu1", nn.ReLU()),
        ("pool1", maxpool_same(2, 2, size=28)),
        ("conv2", conv_same(32, 64, 5, size=14)),
        ("relu2", nn.ReLU()),
        ("pool2", maxpool_same(2, 2, size=14)),
        ("flatten", nn.Flatten()),
        ("dense1", nn.Linear(7 * 7 * 64, 1024)),
        ("relu3", nn.ReLU()),
        ("dense2", nn.Linear(1024, num_outputs)),
    ])
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.05, a=-0.1, b=0.1)
            nn.init.constant_(module.bias, 0.05)
    return net


def conv_3c3d(num_outputs: int = 10) -> nn.Sequential:
    """DeepOBS's 3c3d for 32x32 colour images.

    conv 64 5x5 valid, conv 96 3x3 valid, conv 128 3x3 same, each followed by ReLU and a
    3x3 max-pool of stride 2 (same); dense 512, ReLU; dense 256, ReLU; dense ``num_outputs``.
    Conv weights Xavier normal, dense weights Xavier uniform, biases zero.

    Input ``[N, 3, 32, 32]``; output logits ``[N, num_outputs]``.
    """
    net = _sequential([
        ("conv1", nn.Conv2d(3, 64, 5)),  # 32 -> 28
        ("relu1", nn.ReLU()),
        ("pool1", maxpool_same(3, 2, size=28)),  # -> 14
        ("conv2", nn.Conv2d(64, 96, 3)),  # -> 12
        ("relu2", nn.ReLU()),
        ("pool2", maxpool_same(3, 2, size=12)),  # -> 6
        ("conv3", conv_same(96, 128, 3, size=6)),
        ("relu3", nn.ReLU()),
        ("pool3", maxpool_same(3, 2, size=6)),  # -> 3
        ("flatten", nn.Flatten()),
        ("dense1", nn.Linear(3 * 3 * 128, 512)),
        ("relu4", nn.ReLU()),
        ("dense2", nn.Linear(512, 256)),
        ("relu5", nn.ReLU()),
        ("dense3", nn.Linear(256, num_outputs)),
    ])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def all_cnn_c(num_outputs: int = 100) -> nn.Sequential:
    """DeepOBS's All-CNN-C (Springenberg et al., 2015) for 32x32 colour images.

    Dropout 0.2 on the input; three 3x3 convs of 96 filters (the last with stride 2); dropout
    0.5; three 3x3 convs of 192 (the last with stride 2); dropout 0.5; conv 192 3x3 valid,
    conv 192 1x1, conv ``num_outputs`` 1x1; every conv followed by ReLU; global average over
    the remaining 6x6. Weights Xavier normal, biases 0.1.

    Input ``[N, 3, 32, 32]``; output logits ``[N, num_outputs]``.
    """
    net = _sequential([
        ("dropout1", nn.Dropout(0.2)),
        ("conv1", conv_same(3, 96, 3, size=32)),
        ("relu1", nn.ReLU()),
        ("conv2", conv_same(96, 96, 3, size=32)),
        ("relu2", nn.ReLU()),
        ("conv3", conv_same(96, 96, 3, size=32, stride=2)),  # -> 16
        ("relu3", nn.ReLU()),
        ("dropout2", nn.Dropout(0.5)),
        ("conv4", conv_same(96, 192, 3, size=16)),
        ("relu4", nn.ReLU()),
        ("conv5", conv_same(192, 192, 3, size=16)),
        ("relu5", nn.ReLU()),
        ("conv6", conv_same(192, 192, 3, size=16, stride=2)),  # -> 8
        ("relu6", nn.ReLU()),
        ("dropout3", nn.Dropout(0.5)),
        ("conv7", nn.Conv2d(192, 192, 3)),  # -> 6
        ("relu7", nn.ReLU()),
        ("conv8", nn.Conv2d(192, 192, 1)),
        ("relu8", nn.ReLU()),
        ("conv9", nn.Conv2d(192, num_outputs, 1)),
        ("relu9", nn.ReLU()),
        ("mean", nn.AvgPool2d(6)),
        ("flatten", nn.Flatten()),
    ])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            nn.init.constant_(module.bias, 0.1)
    return net
