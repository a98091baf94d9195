"""DeepOBS's fully connected networks for 28x28 grey images: logistic regression and the MLP."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

MNIST_PIXELS = 28 * 28


def logistic_regression(num_outputs: int = 10) -> nn.Sequential:
    """Multinomial logistic regression, weights and biases initialised to zero.

    Input ``[N, 1, 28, 28]``; output logits ``[N, num_outputs]``.
    """
    net = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("dense", nn.Linear(MNIST_PIXELS, num_outputs)),
    ]))
    nn.init.zeros_(net.dense.weight)
    nn.init.zeros_(net.dense.bias)
    return net


def mlp(num_outputs: int = 10) -> nn.Sequential:
    """The DeepOBS MLP 784-1000-500-100-``num_outputs`` with ReLU activations.

    Weights are drawn from a normal distribution with standard deviation 0.03 truncated at two
    standard deviations (TensorFlow's ``truncated_normal``); biases are zero.

    Input ``[N, 1, 28, 28]``; output logits ``[N, num_outputs]``.
    """
    widths = [MNIST_PIXELS, 1000, 500, 100, num_outputs]
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        layers[f"dense{index}"] = nn.Linear(fan_in, fan_out)
        if index < len(widths) - 1:
            layers[f"relu{index}"] = nn.ReLU()
    net = nn.Sequential(layers)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.03, a=-0.06, b=0.06)
            nn.init.zeros_(module.bias)
    return net
