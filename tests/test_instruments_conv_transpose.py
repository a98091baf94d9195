"""Transposed convolutions (decoders, U-Nets) against the brute-force references, output padding
included: BackPACK's own rules unfolded the input as if the output had none and raised inside the
backward pass, which stopped the training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as ref
from cockpit_cli.instruments import Instruments
from cockpit_cli.instruments.conv_transpose import output_padding
from test_instruments_curvature import reference_values
from test_instruments_exact import FIRST_ORDER, assert_close, check_first_order, histogram_options, one_thread, quantities, train  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

N = 6
CURVATURE = ("HessTrace", "TICDiag", "TICTrace")


def decoder(dims: int, seed: int, **options: int) -> nn.Sequential:
    """A transposed convolution of 4 channels to 4 (``options``: stride, padding, output
    padding, dilation, groups), then Tanh, a convolution and Linear(., 3), in float64:
    ``[N, 4, *(3,) * dims]`` -> ``[N, 3]``."""
    torch.manual_seed(seed)
    transposed, conv = {1: (nn.ConvTranspose1d, nn.Conv1d), 2: (nn.ConvTranspose2d, nn.Conv2d)}[dims]
    up = transposed(4, 4, 3, **options)
    size = up(torch.zeros(1, 4, *(3,) * dims)).shape[2]
    return nn.Sequential(up, nn.Tanh(), conv(4, 2, 2), nn.Flatten(), nn.Linear(2 * (size - 1) ** dims, 3)).double()


def batches(model: nn.Module, dims: int, loss: str, seed: int, steps: int = 2) -> list[ref.Batch]:
    result = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 * seed + step)
        inputs = torch.randn(N, 4, *(3,) * dims, generator=generator, dtype=torch.float64)
        targets = torch.randint(0, 3, (N,), generator=generator) if loss == "ce" else torch.randn(N, 3, generator=generator, dtype=torch.float64)
        result.append(ref.Batch(inputs, targets, *ref.loss_functions(loss)))
    return result


LAYERS = {  # the upsampling layer of decoders, and its variations
    "stride 2, output padding 1": dict(stride=2, padding=1, output_padding=1),
    "dilation 2, output padding 1": dict(stride=2, output_padding=1, dilation=2),
    "two groups, output padding 1": dict(stride=3, padding=1, output_padding=2, groups=2),
    "no output padding": dict(stride=2, padding=1),
}


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_transposed_convolutions_get_exact_values(layer: str, dims: int, loss: str, curvature: str, weight_decay: float) -> None:
    model = decoder(dims, 0, **LAYERS[layer])
    steps = batches(model, dims, loss, 0)
    names = [*FIRST_ORDER, *CURVATURE]
    run = train(model, steps, quantities(names, **histogram_options(model, steps[0], weight_decay)), weight_decay=weight_decay, curvature=curvature)
    assert run.instruments.unavailable == {}
    assert run.instruments.support.per_sample == "backpack"
    for step in range(2):
        check_first_order(run, step, weight_decay)
        expected = reference_values(run, step, curvature, weight_decay)
        assert_close(run.records[step]["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
        assert_close(run.records[step]["TICTrace"], expected["TICTrace"], rel=1e-9, abs=1e-12)


class SizedDecoder(nn.Module):
    """A transposed convolution called with ``output_size`` (one longer than its reach), then Linear(., 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.out = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), nn.Linear(3 * 6 * 6, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(inputs, output_size=(6, 6)).flatten(1))


def test_a_transposed_convolution_called_with_an_output_size_gets_exact_per_sample_values() -> None:
    torch.manual_seed(0)
    model = SizedDecoder().double()
    steps = [ref.Batch(torch.randn(N, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (N,)), *ref.loss_functions("ce")) for _ in range(2)]
    names = [name for name in FIRST_ORDER if name != "Activations"]
    run = train(model, steps, quantities(names, **histogram_options(model, steps[0], 0.0)))
    assert run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step, names=names)


def test_output_padding_is_read_off_the_shapes_of_the_last_call() -> None:
    layer = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, output_padding=(1, 0))
    layer.input0, layer.output = torch.zeros(2, 1, 4, 5), layer(torch.zeros(2, 1, 4, 5))
    assert output_padding(layer) == (1, 0)


def test_the_engine_takes_the_rules_of_transposed_convolutions_with_output_padding() -> None:
    """A decoder's upsampling layer passes the support check and the engine's rules are these."""
    model = decoder(2, 1, stride=2, padding=1, output_padding=1)
    instruments = Instruments(model, nn.CrossEntropyLoss(), ref.cross_entropy_per_sample, torch.optim.SGD(model.parameters(), lr=0.1), quantities(("NormTest", "HessTrace")))
    assert instruments.support.per_sample == "backpack" and instruments.support.curvature


@pytest.mark.parametrize("sum_batch", [True, False])
def test_the_weight_jacobian_s_transpose_matches_autograd(sum_batch: bool) -> None:
    """``J_w^T mat`` for two columns ``mat``: per sample, the gradient of ``sum(layer(x_n) * mat_vn)``."""
    from cockpit_cli.instruments.conv_transpose import TransposedConvDerivatives

    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=1, groups=2).double()
    inputs = torch.randn(3, 4, 3, 4, dtype=torch.float64)
    layer.input0, layer.output = inputs, layer(inputs)
    mat = torch.randn(2, *layer.output.shape, dtype=torch.float64)
    actual = TransposedConvDerivatives(2)._weight_jac_t_mat_prod(layer, (), (), mat, sum_batch=sum_batch)
    expected = torch.stack([
        torch.stack([torch.autograd.grad((layer(inputs[n : n + 1]) * mat[v, n : n + 1]).sum(), layer.weight)[0] for n in range(3)])
        for v in range(2)
    ])  # fmt: skip
    torch.testing.assert_close(actual, expected.sum(1) if sum_batch else expected, rtol=1e-12, atol=1e-12)
