"""The per-sample gradients of the output hooks equal BackPACK's ``grad_batch``.

Linear layers on ``[N, in]`` and ``[N, L, in]`` inputs, Conv1d and Conv2d with bias, and a ReLU
applied in place to a hooked output (the hook must see the gradient before that change; the
reference, which BackPACK's module hooks compute, applies it out of place). A layer's products
with a direction, taken from its factors in one pass, equal those of the same gradients. A layer
run twice hands over one source per run, and sources whose gradient never comes are handed over
at the flush, both without a mean.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad
from torch import Tensor, nn

from cockpit_cli.instruments.convolutions import numeric_padding
from cockpit_cli.instruments.factored_gradients import FactoredSamples
from cockpit_cli.instruments.output_hooks import OutputGradientHooks, layer_products

N = 4


def build(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)), torch.randn(N, 3)
    if kind == "linear3d":
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.Flatten()), torch.randn(N, 6, 3)
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten()), torch.randn(N, 2, 7)
    if kind == "conv2d_same":
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding="same", dilation=2), nn.ReLU(), nn.Flatten()), torch.randn(N, 2, 7, 7)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.ReLU(), nn.Flatten()), torch.randn(N, 2, 7, 7)


def dense(samples: Tensor | FactoredSamples) -> Tensor:
    """Return the per-sample gradients of the mean loss, ``[N, D]`` (``g_i / N``, as BackPACK's)."""
    if isinstance(samples, FactoredSamples):
        return torch.cat(list(samples.blocks())) / samples.n
    return samples.reshape(samples.shape[0], -1)


@pytest.mark.parametrize("at_gradients", [False, True])
@pytest.mark.parametrize("kind", ["linear", "linear3d", "conv1d", "conv2d"])
def test_output_hooks_match_backpack(kind: str, at_gradients: bool) -> None:
    """Each source comes once; waiting for the gradients, each also comes with the parameter's
    accumulated gradient, which is the mean of its per-sample gradients."""
    model, inputs = build(kind)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    hooks = OutputGradientHooks({layer: [layer.weight, layer.bias] for layer in layers})
    found: dict[nn.Module, list[Tensor]] = {layer: [None, None] for layer in layers}
    means: dict[nn.Parameter, Tensor | None] = {}

    def collect(module: nn.Module, param: nn.Parameter, samples: Tensor | FactoredSamples, mean: Tensor | None) -> None:
        assert found[module][0 if param is module.weight else 1] is None
        found[module][0 if param is module.weight else 1] = dense(samples).clone()
        means[param] = mean

    hooks.callback, hooks.at_gradients = collect, at_gradients
    hooks.attach()
    model(inputs).pow(2).mean().backward()
    hooks.flush()
    hooks.detach()
    for layer in layers:
        for param, samples in zip((layer.weight, layer.bias), found[layer]):
            if at_gradients:
                assert means[param].data_ptr() == param.grad.data_ptr()  # the gradient itself, not a copy
                assert torch.allclose(samples.sum(0), param.grad.reshape(-1), rtol=1e-5, atol=1e-7)  # g_i / N summed
            else:
                assert means[param] is None

    reference = extend(copy.deepcopy(model))
    for module in reference.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    with backpack(BatchGrad()):
        reference(inputs).pow(2).mean().backward()
    references = [m for m in reference.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    for layer, twin in zip(layers, references):
        expected = [twin.weight.grad_batch.reshape(N, -1), twin.bias.grad_batch.reshape(N, -1)]
        for actual, wanted in zip(found[layer], expected):
            assert torch.allclose(actual, wanted, rtol=1e-5, atol=1e-7)


def test_output_hooks_hold_a_layer_s_input_only_until_they_run() -> None:
    """After the backward pass the caller's outputs keep the graph, and with it the hooks on it:
    they must not keep the layers' inputs (plain training frees them during the pass)."""
    model, inputs = build("linear")
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hooks = OutputGradientHooks({layer: [layer.weight] for layer in layers})
    hooks.callback = lambda *args: None
    hooks.attach()
    seen: list[weakref.ref] = []
    handle = layers[1].register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[0])))
    outputs = model(inputs)
    outputs.pow(2).mean().backward()
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None  # while outputs is still alive
    handle.remove()
    hooks.detach()


@pytest.mark.parametrize("tracked", ["both", "weight", "bias"])
@pytest.mark.parametrize("kind", ["linear", "linear3d", "conv1d", "conv2d", "conv2d_same"])
def test_a_layer_s_products_with_a_direction_come_from_one_pass(kind: str, tracked: str) -> None:
    """``layer_products`` of a layer's factors (the hooks' layer callback) equals the products of
    its weight's and bias's per-sample gradients (BackPACK's) with the direction, summed; where
    only one of them is tracked, that one's products alone."""
    model, inputs = build(kind)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    generator = torch.Generator().manual_seed(1)
    directions = {layer: [torch.randn(p.shape, generator=generator) for p in (layer.weight, layer.bias)] for layer in layers}
    hooks = OutputGradientHooks({layer: [layer.weight, layer.bias] for layer in layers})
    products: dict[nn.Module, Tensor] = {}

    def project(module: nn.Module, layer_inputs: Tensor, grad_output: Tensor) -> None:
        assert module not in products and not torch.is_grad_enabled()
        weight, bias = directions[module]
        products[module] = layer_products(module, layer_inputs, grad_output, None if tracked == "bias" else weight, None if tracked == "weight" else bias)

    hooks.layer_callback = project
    hooks.callback = lambda *args: pytest.fail("the per-parameter callback ran beside the layer callback")
    hooks.attach()
    model(inputs).pow(2).mean().backward()
    hooks.detach()

    reference = extend(copy.deepcopy(model))
    for module in reference.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if isinstance(module, nn.Conv2d) and module.padding == "same":  # BackPACK computes with numbers
            module.padding = numeric_padding(module)
    with backpack(BatchGrad()):
        reference(inputs).pow(2).mean().backward()
    references = [m for m in reference.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    for layer, twin in zip(layers, references):
        weight, bias = directions[layer]
        expected = torch.zeros(N)
        if tracked != "bias":
            expected += twin.weight.grad_batch.reshape(N, -1) @ weight.reshape(-1)
        if tracked != "weight":
            expected += twin.bias.grad_batch @ bias
        assert products[layer].shape == (N,)
        assert torch.allclose(products[layer], expected, rtol=1e-5, atol=1e-7)


class Twice(nn.Module):
    """One Linear layer applied twice: its parameters' gradients add two sources."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.shared(torch.tanh(self.shared(inputs)))


@pytest.mark.parametrize("at_gradients", [False, True])
def test_a_layer_run_twice_hands_over_one_source_that_adds_up_both_runs(at_gradients: bool) -> None:
    """Every run adds its part to each sample's gradient, so a layer that ran twice hands over one
    source per parameter (norms and histograms of the parts would be no sample's), once the
    gradient is there; waiting for the gradients, with it as the source's mean."""
    torch.manual_seed(0)
    model, inputs = Twice(), torch.randn(N, 3)
    layer = model.shared
    hooks = OutputGradientHooks({layer: [layer.weight, layer.bias]})
    found: dict[nn.Parameter, list[tuple[Tensor, Tensor | None]]] = {layer.weight: [], layer.bias: []}
    hooks.callback = lambda module, param, samples, mean: found[param].append((dense(samples).clone(), mean))
    hooks.at_gradients = at_gradients
    hooks.attach()
    model(inputs).pow(2).mean().backward()
    hooks.flush()
    hooks.detach()
    for param in (layer.weight, layer.bias):
        expected = torch.stack(
            [torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(inputs[i : i + 1]).pow(2).mean() / N, [param])]) for i in range(N)]
        )  # g_i / N by a loop over the samples
        [(samples, mean)] = found[param]
        assert torch.allclose(samples, expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(mean, param.grad) if at_gradients else mean is None


def test_sources_whose_gradient_never_comes_are_handed_over_at_the_flush() -> None:
    """A backward pass that accumulates only the first layer's weight: the second layer's sources
    and the first layer's bias wait in vain, and the flush hands them over without a mean."""
    model, inputs = build("linear")
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hooks = OutputGradientHooks({layer: [layer.weight, layer.bias] for layer in layers})
    means: dict[nn.Parameter, list[Tensor | None]] = {}
    hooks.callback = lambda module, param, samples, mean: means.setdefault(param, []).append(mean)
    hooks.at_gradients = True
    hooks.attach()
    model(inputs).pow(2).mean().backward(inputs=[layers[0].weight])
    assert set(means) == {layers[0].weight}
    hooks.flush()
    hooks.detach()
    assert set(means) == {layers[0].weight, layers[0].bias, layers[1].weight, layers[1].bias}
    assert means[layers[0].weight][0].data_ptr() == layers[0].weight.grad.data_ptr()  # the one gradient that came
    assert [means[p] for p in (layers[0].bias, layers[1].weight, layers[1].bias)] == [[None]] * 3
