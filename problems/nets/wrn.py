"""DeepOBS's wide residual network (Zagoruyko and Komodakis, 2016) for 32x32 colour images.

Pre-activation residual blocks: BatchNorm, ReLU, 3x3 conv, BatchNorm, ReLU, 3x3 conv. The first
block of each group changes width and resolution; its shortcut is a 1x1 convolution of the
block's activated input. The other blocks add their raw input. Convolutions have no biases.

BatchNorm's running statistics follow TensorFlow's decay of 0.9, i.e. ``momentum=0.1`` in
PyTorch's convention. (DeepOBS's PyTorch port passes 0.9 straight to ``nn.BatchNorm2d``, which in
PyTorch means the opposite weighting; we keep the TensorFlow original's meaning.)
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from problems.nets.conv import conv_same

BN_MOMENTUM = 0.1  # = TensorFlow decay 0.9


def _conv(in_channels: int, out_channels: int, kernel: int, size: int, stride: int = 1) -> nn.Module:
    """A bias-free convolution with TensorFlow's "same" padding as one module."""
    layers = conv_same(in_channels, out_channels, kernel, size=size, stride=stride, bias=False)
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """One pre-activation residual block.

    Args:
        in_channels: Channels of the input ``[N, in_channels, size, size]``.
        out_channels: Channels of the output ``[N, out_channels, size / stride, size / stride]``.
        size: Height (= width) of the input.
        stride: Stride of the first convolution (and the shortcut).
        projection: Whether the shortcut is a 1x1 convolution of the activated input (the first
            block of a group) or the identity on the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, stride: int = 1, projection: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=BN_MOMENTUM)
        self.relu1 = nn.ReLU()
        self.shortcut = _conv(in_channels, out_channels, 1, size, stride) if projection else None
        self.conv1 = _conv(in_channels, out_channels, 3, size, stride)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv(out_channels, out_channels, 3, -(-size // stride))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, C_in, H, W]`` to ``[N, C_out, H / stride, W / stride]``."""
        activated = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + identity


def wide_resnet(depth: int = 16, width: int = 4, num_outputs: int = 10) -> nn.Sequential:
    """WRN-``depth``-``width``: a 3x3 conv of 16 filters, three groups of residual blocks with
    ``16 * width``, ``32 * width``, ``64 * width`` filters (strides 1, 2, 2), BatchNorm, ReLU,
    global 8x8 average pool and a dense output layer.

    Conv and dense weights Xavier uniform, dense bias zero, BatchNorm scale one and shift zero.

    Args:
        depth: ``6 * blocks_per_group + 4``; 16 gives DeepOBS's two blocks per group.
        width: Widening factor.
        num_outputs: Number of classes.

    Returns:
        A network mapping ``[N, 3, 32, 32]`` to logits ``[N, num_outputs]``.
    """
    if (depth - 4) % 6:
        raise ValueError(f"wide ResNet depth must be 6 * blocks + 4, got {depth}")
    blocks = (depth - 4) // 6
    filters = [16, 16 * width, 32 * width, 64 * width]
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv1=_conv(3, 16, 3, size=32))
    size = 32
    for group, stride in enumerate((1, 2, 2), start=1):
        for block in range(1, blocks + 1):
            first = block == 1
            layers[f"res_unit{group}{block}"] = ResidualBlock(
                filters[group - 1] if first else filters[group],
                filters[group],
                size=size,
                stride=stride if first else 1,
                projection=first,
            )
            if first:
                size = -(-size // stride)
    layers["bn"] = nn.BatchNorm2d(filters[3], momentum=BN_MOMENTUM)
    layers["relu"] = nn.ReLU()
    layers["avg_pool"] = nn.AvgPool2d(size)
    layers["flatten"] = nn.Flatten()
    layers["dense"] = nn.Linear(filters[3], num_outputs)
    net = nn.Sequential(layers)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return net
