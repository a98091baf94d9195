"""DeepOBS's variational autoencoder for 28x28 grey images.

Encoder: three 4x4 convolutions of 64 filters (strides 2, 2, 1, TensorFlow "same" padding), each
followed by leaky ReLU (slope 0.3) and dropout 0.2; two dense heads give the latent mean and the
latent log standard deviation (the second head's output is halved, as in DeepOBS).

Decoder: dense 24 and dense 49 with leaky ReLU, reshaped to ``[1, 7, 7]``; three 4x4 transposed
convolutions of 64 filters (strides 2, 1, 1) with ReLU and dropout 0.2; a dense layer to 784
pixels with a sigmoid, reshaped to ``[1, 28, 28]``.

The transposed convolutions reproduce DeepOBS's port of TensorFlow's "same" padding: the input
is zero padded first, then convolved with ``padding = kernel - 1``. All weights Xavier uniform,
all biases zero. Every parametrised layer is a plain ``torch.nn`` layer, so BackPACK's
first-order extensions can extend the model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from problems.nets.conv import conv_same

SLOPE = 0.3
DROPOUT = 0.2
FILTERS = 64


def _transposed_same(in_channels: int, out_channels: int, size: int, stride: int, kernel: int = 4) -> list[nn.Module]:
    """A transposed convolution from ``size`` to ``size * stride`` pixels, as DeepOBS builds it."""
    total = max((size - 1) * stride + kernel - size * stride, 0)
    before = total // 2
    pad = nn.ZeroPad2d((before, total - before, before, total - before))
    return [pad, nn.ConvTranspose2d(in_channels, out_channels, kernel, stride=stride, padding=kernel - 1)]


class VAE(nn.Module):
    """The DeepOBS VAE.

    Args:
        latent: Dimension of the latent space (DeepOBS: 8).
    """

    def __init__(self, latent: int = 8):
        super().__init__()
        encoder: list[nn.Module] = []
        for in_channels, size, stride in ((1, 28, 2), (FILTERS, 14, 2), (FILTERS, 7, 1)):
            encoder += conv_same(in_channels, FILTERS, 4, size=size, stride=stride)
            encoder += [nn.LeakyReLU(SLOPE), nn.Dropout(DROPOUT)]
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.mean = nn.Linear(7 * 7 * FILTERS, latent)
        self.log_std = nn.Linear(7 * 7 * FILTERS, latent)
        self.decoder_dense = nn.Sequential(OrderedDict([
            ("dense1", nn.Linear(latent, 24)),
            ("act1", nn.LeakyReLU(SLOPE)),
            ("dense2", nn.Linear(24, 49)),
            ("act2", nn.LeakyReLU(SLOPE)),
        ]))
        deconv: list[nn.Module] = []
        for in_channels, size, stride in ((1, 7, 2), (FILTERS, 14, 1), (FILTERS, 14, 1)):
            deconv += _transposed_same(in_channels, FILTERS, size=size, stride=stride)
            deconv += [nn.ReLU(), nn.Dropout(DROPOUT)]
        self.decoder_deconv = nn.Sequential(*deconv, nn.Flatten())
        self.decoder_out = nn.Sequential(nn.Linear(14 * 14 * FILTERS, 28 * 28), nn.Sigmoid())
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map images ``[N, 1, 28, 28]`` to the latent mean and log std, each ``[N, latent]``."""
        features = self.encoder(x)
        return self.mean(features), 0.5 * self.log_std(features)

    def decode(self, z: Tensor) -> Tensor:
        """Map latent codes ``[N, latent]`` to images ``[N, 1, 28, 28]`` with values in (0, 1)."""
        hidden = self.decoder_dense(z).view(-1, 1, 7, 7)
        return self.decoder_out(self.decoder_deconv(hidden)).view(-1, 1, 28, 28)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, sample ``z = mean + eps * exp(log_std)`` with ``eps ~ N(0, I)``, decode.

        Args:
            x: Images ``[N, 1, 28, 28]``.

        Returns:
            ``(reconstruction [N, 1, 28, 28], mean [N, latent], log_std [N, latent])``.
        """
        mean, log_std = self.encode(x)
        z = mean + torch.randn_like(log_std) * torch.exp(log_std)
        return self.decode(z), mean, log_std
