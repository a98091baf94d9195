"""Operations a model computes on one tensor in its own forward, as layers of its curvature graph.

A model may call ``torch.relu(h)``, ``h.mean(2)`` or ``h.view(h.size(0), -1)`` in its forward
instead of a module. BackPACK's converter leaves such a call in the graph, whose rules only
follow modules. :func:`operations_as_layers` calls each of them as a layer instead: the
activations BackPACK has rules for as those layers (``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid``),
any other as a :class:`TensorOperation`, which autograd's rules follow (:mod:`autograd_layers`).
An operation may also read tensors of the model that no layer holds (``h + self.positions``):
its layer holds them, the very tensors, so that a parameter's diagonal comes with it. An
operation of several tensors of the graph (a product of two activations) stays as it is, and so
does one that draws random numbers (dropout), which cannot be computed again alike.

Those rules hold for an operation that treats every sample alone. A :class:`TensorOperation`
checks that at its first call (:func:`check_samples_alone`): its output on the batch's first and
last sample, each a batch of its own, must be the rows of its output on the batch (``h.mean(0)``
or ``h.flip(0)`` is not; the graph's pass then fails, saying which operation mixes the samples).
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


@dataclass(frozen=True)
class Held:
    """An argument of an operation that is a tensor of the model (a parameter, a buffer) the
    operation's layer holds under ``name``."""

    name: str


class _Input:
    """Where the operation's input goes among its arguments."""

    def __repr__(self) -> str:
        return "<input>"


INPUT = _Input()


class CheckedLayer(nn.Module):
    """A layer of a curvature graph whose first call checks that it treats every sample alone
    and draws no random numbers (:func:`check_samples_alone`): subclasses give ``compute`` and
    ``described``."""

    checked = False

    def compute(self, inputs: Tensor) -> Any:
        raise NotImplementedError

    def described(self) -> str:
        raise NotImplementedError

    def forward(self, inputs: Tensor) -> Any:
        outputs = self.compute(inputs)
        if not self.checked:
            check_samples_alone(self.compute, inputs, outputs, self.described())
            self.checked = True
        return outputs


class TensorOperation(CheckedLayer):
    """An operation of the model's forward on one tensor, as a layer of one input (and of the
    model's own tensors it reads: ``h + self.positions``, which it holds, the very tensors).

    Args:
        operation: The function called, or the name of the tensor method.
        arguments: Its positional arguments, with :data:`INPUT` for the input, :class:`SizeOf`
            for sizes of it and :class:`Held` for the tensors in ``held`` (nested in tuples and
            lists too).
        keywords: Its keyword arguments, alike.
        name: The operation's name in the model's graph (for messages).
        held: The model's parameters and buffers it reads, by the names in its arguments.
    """

    def __init__(self, operation: Callable[..., Any] | str, arguments: tuple, keywords: dict[str, Any], name: str, held: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.operation = operation
        self.arguments = arguments
        self.keywords = keywords
        self.name = name
        for key, tensor in (held or {}).items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(key, tensor)
            else:
                self.register_buffer(key, tensor)

    def compute(self, inputs: Tensor) -> Any:
        """The operation on ``inputs`` ``[N, ...]``."""

        def filled(argument: Any) -> Any:
            if argument is INPUT:
                return inputs
            if isinstance(argument, SizeOf):
                return argument.of(inputs)
            return getattr(self, argument.name) if isinstance(argument, Held) else argument

        def marker(argument: Any) -> bool:
            return argument is INPUT or isinstance(argument, (SizeOf, Held))

        arguments = tree_map(filled, self.arguments, is_leaf=marker)
        keywords = tree_map(filled, self.keywords, is_leaf=marker)
        if isinstance(self.operation, str):
            return getattr(arguments[0], self.operation)(*arguments[1:], **keywords)
        return self.operation(*arguments, **keywords)

    def described(self) -> str:
        return f"the operation '{self.name}' of the model's forward"


def check_samples_alone(compute: Callable[[Tensor], Any], inputs: Tensor, outputs: Any, what: str) -> None:
    """Raise ``ValueError`` where ``compute``'s output on the batch's first or last sample alone
    (a batch of one) is not that sample's row of its ``outputs`` on the batch ``inputs``: it mixes
    the samples; or where its output on the batch again differs: it draws random numbers
    (``what`` names it in the message)."""
    if not isinstance(outputs, Tensor):
        raise ValueError(f"{what} returns a {type(outputs).__name__}, not a tensor")
    samples = len(inputs)
    with torch.no_grad():
        if not _close(compute(inputs.detach()), outputs.detach()):
            raise ValueError(f"{what} draws random numbers (dropout in its forward?), which the curvature's rules cannot draw again")
        for row in sorted({0, samples - 1}):
            alone = compute(inputs[row : row + 1].detach())
            if outputs.dim() == 0 or len(outputs) != samples or alone.shape != outputs[row : row + 1].shape or not _close(alone, outputs[row : row + 1].detach()):
                raise ValueError(
                    f"{what} mixes the samples of a batch (its output on a sample alone is not that sample's row of its "
                    "output on the batch), which the curvature's rules cannot follow"
                )


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of a computation in another order (``sqrt(eps)``)."""
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    tolerance = torch.finfo(a.dtype).eps ** 0.5
    return bool(torch.allclose(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max()) if b.numel() else 0.0, equal_nan=True))


def operations_as_layers(graph: fx.GraphModule, skipped: set[str]) -> list[nn.Module]:
    """Call every operation of ``graph`` on one of its tensors (beside numbers, sizes of that
    tensor and tensors of the model that no layer of the graph holds, each read by this operation
    alone) as a layer, but those named in ``skipped`` that read no such tensor; the size
    computations and tensors left unused go. Return the layers added."""
    added: list[nn.Module] = []
    in_layers = {id(tensor) for node in graph.graph.nodes if node.op == "call_module" for tensor in _tensors_of(graph.get_submodule(node.target))}
    for node in list(graph.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target is getattr or _size_of(graph, node) is not None:
            continue
        name = operation_name(node)
        leaves = [leaf for leaf in tree_flatten((node.args, node.kwargs))[0] if isinstance(leaf, fx.Node)]
        held = {leaf: _held(graph, leaf, in_layers) for leaf in leaves if leaf.op == "get_attr"}
        if (name in skipped and not held) or "dropout" in name or name.strip("_") in RANDOM or any(user.target is operator.getitem for user in node.users):
            continue  # (an operation that returns a tuple, whose elements the graph takes)
        if any(tensor is None for tensor in held.values()):
            continue  # a tensor a layer holds too, or one read elsewhere
        tensors = {leaf for leaf in leaves if _size_of(graph, leaf) is None and leaf not in held}
        if len(tensors) != 1:
            continue
        (tensor,) = tensors
        sizes = {leaf: _size_of(graph, leaf) for leaf in leaves if leaf is not tensor and leaf not in held}
        if any(_sized(graph, leaf) is not tensor for leaf in sizes):
            continue  # a size of another tensor
        layer = _layer(node, name, tensor, sizes, held)
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
    """What ``graph`` computes outside its layers (after :func:`operations_as_layers`) but the
    operations named in ``skipped`` and the sizes of tensors, in words ("computes 'matmul'
    outside a module"; of an operation that reads a tensor of the model: "uses its tensor
    'embed.weight' outside a layer"), or ``None``."""
    for node in graph.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target is not getattr and _size_of(graph, node) is None:
            name = operation_name(node)
            if name in skipped:
                continue
            read = [leaf.target for leaf in tree_flatten((node.args, node.kwargs))[0] if isinstance(leaf, fx.Node) and leaf.op == "get_attr"]
            return f"uses its tensor '{read[0]}' outside a layer" if read else f"computes '{name}' outside a module"
    return None


def operation_name(node: fx.Node) -> str:
    """The name of the function or method ``node`` calls."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _tensors_of(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _held(graph: fx.GraphModule, node: fx.Node, in_layers: set[int]) -> Tensor | None:
    """The model's tensor that the ``get_attr`` ``node`` reads, where an operation's layer may
    hold it: one no layer of the graph holds (no tied weight), read by one operation; else ``None``."""
    try:
        owner, _, attribute = node.target.rpartition(".")
        tensor = getattr(graph.get_submodule(owner), attribute)
    except AttributeError:
        return None
    if not isinstance(tensor, Tensor) or id(tensor) in in_layers or len(node.users) != 1:
        return None
    return tensor


def _layer(node: fx.Node, name: str, tensor: fx.Node, sizes: dict[fx.Node, SizeOf], held: dict[fx.Node, Tensor]) -> nn.Module | None:
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
    keys = {leaf: leaf.target.replace(".", "_") for leaf in held}

    def marked(argument: Any) -> Any:
        if not isinstance(argument, fx.Node):
            return argument
        return INPUT if argument is tensor else Held(keys[argument]) if argument in keys else sizes[argument]

    arguments = tree_map(marked, node.args, is_leaf=lambda a: isinstance(a, fx.Node))
    keywords = tree_map(marked, keywords, is_leaf=lambda a: isinstance(a, fx.Node))
    return TensorOperation(operation, arguments, keywords, name, {keys[leaf]: value for leaf, value in held.items()})


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
