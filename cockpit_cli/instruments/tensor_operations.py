"""Operations a model computes on one tensor in its own forward, as layers of its curvature graph.

A model may call ``torch.relu(h)``, ``h.mean(2)`` or ``h.view(h.size(0), -1)`` in its forward
instead of a module. BackPACK's converter leaves such a call in the graph, whose rules only
follow modules. :func:`operations_as_layers` calls each of them as a layer instead: the
activations BackPACK has rules for as those layers (``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid``),
any other as a :class:`TensorOperation`, which autograd's rules follow (:mod:`autograd_layers`).
An operation of several tensors of the graph (a product of two activations) stays as it is,
and so does one that draws random numbers (dropout), which cannot be computed again alike.

Those rules hold for an operation that treats every sample alone. A :class:`TensorOperation`
checks that at its first call: its output on the batch's first and last sample, each a batch of
its own, must be the rows of its output on the batch (``h.mean(0)`` or ``h.flip(0)`` is not; the
graph's pass then fails, saying which operation mixes the samples).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from backpack.custom_module.reduce_tuple import ReduceTuple
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_map

# Activations BackPACK has rules for, by the function or method the forward calls (without
# further arguments): its own rules are cheaper than autograd's.
ACTIVATIONS: dict[Any, type[nn.Module]] = {
    torch.relu: nn.ReLU, nn.functional.relu: nn.ReLU, "relu": nn.ReLU,
    torch.tanh: nn.Tanh, nn.functional.tanh: nn.Tanh, "tanh": nn.Tanh,
    torch.sigmoid: nn.Sigmoid, nn.functional.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid,
    nn.functional.gelu: nn.GELU, nn.functional.silu: nn.SiLU, nn.functional.elu: nn.ELU, nn.functional.softplus: nn.Softplus,
}
# Operations that draw random numbers, by name (beside every dropout): their layer could not be
# computed again alike.
RANDOM = {
    "bernoulli", "rand_like", "randn_like", "randint_like", "normal", "multinomial", "uniform", "exponential",
    "geometric", "cauchy", "log_normal", "random", "rrelu", "gumbel_softmax", "fractional_max_pool2d", "fractional_max_pool3d",
}


@dataclass(frozen=True)
class SizeOf:
    """An argument of an operation that is a size of its input: ``x.size(dim)`` (``dim`` None:
    ``x.size()``), as the graph computed it from the input."""

    dim: int | None

    def of(self, inputs: Tensor) -> Any:
        return inputs.size() if self.dim is None else inputs.size(self.dim)


class _Input:
    """Where the operation's input goes among its arguments."""

    def __repr__(self) -> str:
        return "<input>"


INPUT = _Input()


class TensorOperation(nn.Module):
    """An operation of the model's forward on one tensor, as a layer of one input.

    Args:
        operation: The function called, or the name of the tensor method.
        arguments: Its positional arguments, with :data:`INPUT` for the input and
            :class:`SizeOf` for sizes of it (nested in tuples and lists too).
        keywords: Its keyword arguments, alike.
        name: The operation's name in the model's graph (for messages).
    """

    def __init__(self, operation: Callable[..., Any] | str, arguments: tuple, keywords: dict[str, Any], name: str) -> None:
        super().__init__()
        self.operation = operation
        self.arguments = arguments
        self.keywords = keywords
        self.name = name
        self.checked = False  # whether a call on a batch showed that it treats every sample alone

    def compute(self, inputs: Tensor) -> Any:
        """The operation on ``inputs`` ``[N, ...]``."""

        def filled(argument: Any) -> Any:
            return inputs if argument is INPUT else argument.of(inputs) if isinstance(argument, SizeOf) else argument

        arguments = tree_map(filled, self.arguments, is_leaf=lambda a: a is INPUT or isinstance(a, SizeOf))
        keywords = tree_map(filled, self.keywords, is_leaf=lambda a: a is INPUT or isinstance(a, SizeOf))
        if isinstance(self.operation, str):
            return getattr(arguments[0], self.operation)(*arguments[1:], **keywords)
        return self.operation(*arguments, **keywords)

    def forward(self, inputs: Tensor) -> Any:
        outputs = self.compute(inputs)
        if not self.checked:
            self._check_samples_alone(inputs, outputs)
        return outputs

    def _check_samples_alone(self, inputs: Tensor, outputs: Any) -> None:
        """Raise ``ValueError`` where the output on a sample alone is not its row of the batch's."""
        if isinstance(inputs, Tensor) and not isinstance(outputs, Tensor):
            raise ValueError(f"the operation '{self.name}' of the model's forward returns a {type(outputs).__name__}, not a tensor")
        samples = len(inputs)
        with torch.no_grad():
            for row in sorted({0, samples - 1}):
                alone = self.compute(inputs[row : row + 1].detach())
                if outputs.dim() == 0 or len(outputs) != samples or alone.shape != outputs[row : row + 1].shape or not _close(alone, outputs[row : row + 1].detach()):
                    raise ValueError(
                        f"the operation '{self.name}' of the model's forward mixes the samples of a batch (its output on a sample "
                        "alone is not that sample's row of its output on the batch), which the curvature's rules cannot follow"
                    )
        self.checked = True


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of a computation in another order (``sqrt(eps)``)."""
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    tolerance = torch.finfo(a.dtype).eps ** 0.5
    return bool(torch.allclose(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max()) if b.numel() else 0.0, equal_nan=True))


def operations_as_layers(graph: fx.GraphModule, skipped: set[str]) -> list[nn.Module]:
    """Call every operation of ``graph`` on one of its tensors (beside numbers and sizes of that
    tensor) as a layer, but those named in ``skipped``; the size computations left unused go.
    Return the layers added."""
    added: list[nn.Module] = []
    for node in list(graph.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target is getattr or _size_of(graph, node) is not None:
            continue
        name = operation_name(node)
        if name in skipped or "dropout" in name or name.strip("_") in RANDOM or any(user.target is operator.getitem for user in node.users):
            continue  # (an operation that returns a tuple, whose elements the graph takes)
        leaves = [leaf for leaf in tree_flatten((node.args, node.kwargs))[0] if isinstance(leaf, fx.Node)]
        tensors = {leaf for leaf in leaves if _size_of(graph, leaf) is None}
        if len(tensors) != 1:
            continue
        (tensor,) = tensors
        sizes = {leaf: _size_of(graph, leaf) for leaf in leaves if leaf is not tensor}
        if any(_sized(graph, leaf) is not tensor for leaf in sizes):
            continue  # a size of another tensor
        layer = _layer(node, name, tensor, sizes)
        if layer is None:
            continue
        target = f"{name.strip('_')}_operation{len(added)}"
        graph.add_submodule(target, layer)
        added.append(layer)
        with graph.graph.inserting_after(node):
            call = graph.graph.call_module(target, (tensor,))
        node.replace_all_uses_with(call)
        graph.graph.erase_node(node)
    if added:
        graph.graph.eliminate_dead_code()
        graph.recompile()
    return added


def unfollowed_operation(graph: fx.GraphModule, skipped: set[str]) -> str | None:
    """The name of an operation of ``graph`` outside its layers (after :func:`operations_as_layers`)
    but those named in ``skipped`` and the sizes of tensors, or ``None``."""
    for node in graph.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target is not getattr and _size_of(graph, node) is None:
            name = operation_name(node)
            if name not in skipped:
                return name
    return None


def operation_name(node: fx.Node) -> str:
    """The name of the function or method ``node`` calls."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _layer(node: fx.Node, name: str, tensor: fx.Node, sizes: dict[fx.Node, SizeOf]) -> nn.Module | None:
    """The layer that computes ``node`` from ``tensor``, or ``None``: an operation in place whose
    input is read elsewhere too (the layer computes out of place, as its input is kept for the
    rules), or an in-place method without an out-of-place twin."""
    operation: Callable[..., Any] | str = node.target
    keywords = dict(node.kwargs)
    in_place = keywords.get("inplace") is True or (isinstance(operation, str) and operation.endswith("_") and not operation.endswith("__"))
    if in_place:
        if len(tensor.users) - len(sizes) != 1 or (isinstance(operation, str) and not hasattr(Tensor, operation[:-1])):
            return None
        if isinstance(operation, str):
            operation = operation[:-1]
        else:
            keywords["inplace"] = False
    activation = ACTIVATIONS.get(operation)
    if activation is not None and node.args == (tensor,) and not set(keywords) - {"inplace"}:
        return activation()

    def marked(argument: Any) -> Any:
        return INPUT if argument is tensor else sizes.get(argument, argument) if isinstance(argument, fx.Node) else argument

    arguments = tree_map(marked, node.args, is_leaf=lambda a: isinstance(a, fx.Node))
    keywords = tree_map(marked, keywords, is_leaf=lambda a: isinstance(a, fx.Node))
    return TensorOperation(operation, arguments, keywords, name)


def _size_of(graph: fx.GraphModule, node: fx.Node) -> SizeOf | None:
    """The size ``node`` computes of a tensor of the graph (``x.size(d)``, ``x.shape``,
    ``x.shape[d]``), or ``None``."""
    if node.op == "call_method" and node.target == "size" and not node.kwargs:
        return SizeOf(node.args[1] if len(node.args) > 1 else None) if len(node.args) <= 2 else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return SizeOf(None)
    source, index = None, None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int):
        source, index = node.args
    elif node.op == "call_module" and isinstance(graph.get_submodule(node.target), ReduceTuple):
        source, index = node.args[0], graph.get_submodule(node.target).index
    if source is not None and _size_of(graph, source) == SizeOf(None):
        return SizeOf(index)
    return None


def _sized(graph: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The tensor whose size :func:`_size_of` ``node`` computes."""
    while _size_of(graph, node) is not None and not (node.op == "call_method" and node.target == "size") and not (node.target is getattr):
        node = node.args[0]
    return node.args[0]
