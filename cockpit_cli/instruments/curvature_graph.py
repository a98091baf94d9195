"""Curvature diagonals of models that are no ``nn.Sequential``, through BackPACK's converter.

BackPACK backpropagates a curvature factor through a chain of layers. Its converter traces a
model with ``torch.fx`` into a graph of modules, in which the additions of residual connections,
products with numbers, flattening and in-place operations become modules with rules of their
own; its generalised Gauss-Newton extensions (exact and Monte-Carlo) follow such a graph, and
so does the Hessian's with the rules of :mod:`graph_hessian`. The graph calls the model's own layers, whose parameters are the training's
tensors, so a forward and a backward pass through it at a tracked step give the model's GGN
diagonal (and BackPACK's per-sample gradients beside it).

The graph calls torch's layers as layers, also those with sublayers (``nn.TransformerEncoderLayer``,
a parametrized layer): autograd's rules follow them whole (:mod:`autograd_layers`). A
self-attention ``nn.MultiheadAttention`` is called as a layer of one input
(:class:`SelfAttention`), and a block of the model's own that computes operations the converter
cannot follow (attention written with tensor operations) is called as a layer too, taken whole,
the innermost such block.

Operations the model's forward computes on one tensor (``torch.relu(h)``, ``h.mean(1)``) are
layers of the graph too (:mod:`tensor_operations`), made so before the converter runs (it cannot
take a function called twice). A model the converter cannot trace (a loop over a traced size, a
layer with parameters called twice) or one that computes an operation of several of
its tensors outside a module (``torch.maximum(a, b)``) gets its GGN diagonal through a graph of
one layer, the whole model, which autograd's rules follow (a per-sample backward pass per column
of the loss's curvature factor); its Hessian diagonal only from products, where it is small
(:mod:`support`), else the reason.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

from backpack.custom_module.graph_utils import BackpackTracer, convert_module_to_backpack
from backpack.custom_module.reduce_tuple import ReduceTuple
from torch import Tensor, fx, nn

from cockpit_cli.instruments.autograd_layers import attention_obstacle, autograd_obstacle
from cockpit_cli.instruments.curvature_diagonal import curvature_extension, settings_obstacle
from cockpit_cli.instruments.extension_rules import module_rules
from cockpit_cli.instruments.tensor_operations import CheckedLayer, TensorOperation, operation_name, operations_as_layers, unfollowed_operation


@lru_cache(maxsize=None)
def curvature_layers(curvature: str) -> dict[type, object]:
    """Return the rules, by layer class, that the instruments take for ``curvature`` (one dict per
    curvature: not to be changed)."""
    return module_rules(curvature_extension(curvature))


def curvature_obstacle(name: str, module: nn.Module, curvature: str, whole: bool = False) -> str | None:
    """Why the rules of ``curvature`` do not follow the layer ``name``, or ``None`` (``whole``: a
    layer with sublayers that the model's graph calls as one layer)."""
    kind, rules = type(module).__name__, curvature_layers(curvature)
    if type(module) not in rules:  # a layer BackPACK does not know: autograd's rules (autograd_layers)
        obstacle = autograd_obstacle(module, whole)
        if obstacle is None and curvature == "hessian":
            obstacle = attention_obstacle(module)
        return None if obstacle is None else f"layer '{name}' ({kind}) {obstacle}"
    setting = settings_obstacle(rules[type(module)], module)
    return None if setting is None else f"layer '{name}' ({kind}) has settings BackPACK's curvature rule does not cover ({setting})"


class SelfAttention(nn.Module):
    """An ``nn.MultiheadAttention`` whose queries, keys and values are one input, as a layer of one
    input and one output: its attention output (``[0]``), with the call's other options."""

    def __init__(self, attention: nn.MultiheadAttention, options: dict[str, Any], name: str) -> None:
        super().__init__()
        self.attention = attention
        self.options = options
        self.name = name  # the model's name of the attention layer

    def forward(self, inputs: Tensor) -> Tensor:
        return self.attention(inputs, inputs, inputs, **self.options)[0]


def _self_attention_as_layers(graph: fx.GraphModule) -> None:
    """Call every ``nn.MultiheadAttention`` of ``graph`` that attends an input to itself, with
    options that are no tensors of the graph (no masks computed in it) and only its output used,
    as a :class:`SelfAttention` layer (the converter leaves a call of three inputs whose tuple is
    taken apart outside a module, which BackPACK's rules cannot follow)."""
    signature = inspect.signature(nn.MultiheadAttention.forward)
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), nn.MultiheadAttention):
            continue
        try:
            arguments = signature.bind(None, *node.args, **node.kwargs).arguments
        except TypeError:
            continue
        query, key, value = (arguments.pop(name, None) for name in ("query", "key", "value"))
        arguments.pop("self")
        options = dict(arguments)
        if not (isinstance(query, fx.Node) and query is key is value) or any(isinstance(option, fx.Node) for option in options.values()):
            continue
        users = list(node.users)
        if not all(_first_of_tuple(graph, user) for user in users):
            continue
        name = f"{node.target.replace('.', '_')}_as_self_attention"
        graph.add_submodule(name, SelfAttention(graph.get_submodule(node.target), options, node.target))
        with graph.graph.inserting_after(node):
            layer = graph.graph.call_module(name, (query,))
        for user in users:
            user.replace_all_uses_with(layer)
            graph.graph.erase_node(user)
        graph.graph.erase_node(node)
    graph.recompile()


def _first_of_tuple(graph: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` takes the first element of its input's tuple (``[0]``, which the converter
    makes a module of its own)."""
    if node.op == "call_function":
        return node.target is operator.getitem and node.args[1] == 0
    return node.op == "call_module" and isinstance(graph.get_submodule(node.target), ReduceTuple) and graph.get_submodule(node.target).index == 0


def graph_layers(graph: fx.GraphModule) -> list[nn.Module]:
    """The layers ``graph`` calls (a layer with sublayers as one layer)."""
    return list(dict.fromkeys(graph.get_submodule(node.target) for node in graph.graph.nodes if node.op == "call_module"))


def graph_operations(graph: fx.GraphModule) -> list[nn.Module]:
    """The operations of the model's forward that ``graph`` calls as layers of its own (:mod:`tensor_operations`)."""
    return [layer for layer in graph_layers(graph) if isinstance(layer, TensorOperation)]


def whole_layers(graph: fx.GraphModule) -> list[nn.Module]:
    """The layers with sublayers that ``graph`` calls as one layer (autograd's rules follow them whole)."""
    return [layer for layer in graph_layers(graph) if list(layer.children())]


# Operations BackPACK's converter makes modules of (sums, products with numbers, flattening,
# permutations, the elements of a layer's tuple), by the names fx gives them
CONVERTED = {"add", "mul", "multiply", "flatten", "permute", "transpose", "getitem"}


def _blocks_with_operations(model: nn.Module) -> list[list[nn.Module]]:
    """Return choices of the model's own blocks (modules of classes of its own with parameters,
    not the model) to take whole, to try in turn: where the model traces, those computing
    operations the converter makes no modules of, then those computing any operation outside a
    layer, each the innermost block that computes it; where it does not trace (a block slices a
    tensor by a traced size), its innermost blocks, then those up to one level above, and so on."""
    try:
        traced = BackpackTracer().trace(model)
    except Exception:  # noqa: BLE001 - a block that cannot be traced is taken whole
        return _block_levels(model)
    foreign: dict[str, None] = {}
    any_operation: dict[str, None] = {}
    for node in traced.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).keys())
        if not stack or not stack[-1]:
            continue  # the model's own forward: no block to take whole
        any_operation[stack[-1]] = None
        if operation_name(node) not in CONVERTED:
            foreign[stack[-1]] = None
    return [[model.get_submodule(path) for path in paths] for paths in (foreign, any_operation) if paths]


def _block_levels(model: nn.Module) -> list[list[nn.Module]]:
    """The model's own blocks by height (0: no block of its own inside), as cumulative levels."""
    heights: dict[nn.Module, int] = {}

    def height(module: nn.Module) -> int | None:  # the greatest height of a block in the subtree, None without one
        below = max((h for h in (height(child) for child in module.children()) if h is not None), default=None)
        if module is model or type(module).__module__.startswith("torch.") or not any(True for _ in module.parameters()):
            return below
        heights[module] = 0 if below is None else below + 1
        return heights[module]

    height(model)
    return [[block for block, h in heights.items() if h <= level] for level in sorted(set(heights.values()))]


@contextmanager
def _as_leaves(blocks: list[nn.Module]) -> Iterator[None]:
    """Make BackPACK's tracer call ``blocks`` as layers instead of tracing into them."""
    original = BackpackTracer.is_leaf_module
    chosen = {id(block) for block in blocks}

    def is_leaf_module(tracer: BackpackTracer, module: nn.Module, name: str) -> bool:
        return id(module) in chosen or original(tracer, module, name)

    BackpackTracer.is_leaf_module = is_leaf_module
    try:
        yield
    finally:
        BackpackTracer.is_leaf_module = original


def curvature_graph(model: nn.Module, curvature: str) -> tuple[fx.GraphModule | None, str | None]:
    """Return BackPACK's graph of ``model`` whose layers have rules of ``curvature`` (``hessian``,
    ``ggn`` or ``ggn_mc``) and a note, or ``None`` and why not (:func:`_converted`). Where the
    model's own blocks compute operations outside its layers (attention written with tensor
    operations), the graph calls them as layers, taken whole (autograd's rules): those with
    operations the converter makes no modules of, else those with any. Where none of that
    follows the model, the GGN's graph calls the whole model as its one layer (:class:`WholeModel`,
    with :data:`WHOLE_NOTE`)."""
    graph, reason = _converted(model, curvature, [])
    for blocks in _blocks_with_operations(model) if graph is None else []:
        whole, whole_reason = _converted(model, curvature, blocks)
        if whole is not None:
            return whole, None
        reason = reason if whole_reason is None else whole_reason
    whole = whole_model_graph(model, curvature) if graph is None else None
    if whole is not None:
        return whole, WHOLE_NOTE.format(name=type(model).__name__, reason=reason)
    return graph, reason


WHOLE_COLUMNS_MOST = 32  # columns of the loss's curvature factor the whole model's GGN takes a backward pass per sample for
WHOLE_TOO_MANY = (
    "the GGN through the whole model {name} would take {columns} backward passes per sample at each step with HessTrace "
    "or TIC due, one per column of the loss's curvature factor (at most {most}): curvature: ggn_mc takes one"
)


def takes_model_whole(graph: fx.GraphModule) -> bool:
    """Whether ``graph`` is one of :func:`whole_model_graph`'s."""
    return any(isinstance(layer, WholeModel) for layer in graph_layers(graph))


def whole_model_graph(model: nn.Module, curvature: str) -> fx.GraphModule | None:
    """Return a graph of one layer, ``model`` whole (:class:`WholeModel`), for the GGN's
    diagonal (``ggn`` or ``ggn_mc``), or ``None``: for the Hessian's (a product per parameter:
    small models get those, :mod:`support`), a model of several inputs, or one that autograd's
    rules cannot follow whole (:func:`autograd_layers.autograd_obstacle`)."""
    if curvature == "hessian" or not _one_input(model):
        return None
    layer = WholeModel(model)
    return _converted(_Container(layer), curvature, [layer])[0]


WHOLE_NOTE = (
    "the GGN diagonal comes from autograd through the whole model {name}, a per-sample backward pass for every column "
    "of the loss's curvature factor (exact, slower), as BackPACK's rules do not follow it: {reason}"
)


class WholeModel(CheckedLayer):
    """A model of one input as a layer, the one of a graph (in a :class:`_Container`), which
    autograd's rules follow whole (:mod:`autograd_layers`): the last way to its GGN diagonal,
    where the converter cannot follow its forward (a loop over a size it cannot trace, an
    operation of two of its tensors, a tied weight; not control flow on tensor values, which
    ``vmap`` cannot run). Its first call checks that it treats every sample alone and draws no
    random numbers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)

    def described(self) -> str:
        return f"the model {type(self.model).__name__}"


def _one_input(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes one input (a layer's rules take one)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return len(positional) >= 1 and len(required) <= 1


class _Container(nn.Module):
    """What the converter traces to a graph that calls ``layer`` (a leaf there)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layer(inputs)


def _converted(model: nn.Module, curvature: str, blocks: list[nn.Module]) -> tuple[fx.GraphModule | None, str | None]:
    """Return BackPACK's graph of ``model`` whose layers are the model's own and have rules of
    ``curvature`` (``hessian``, ``ggn`` or ``ggn_mc``), or ``None`` and why not.

    The converter switches in-place modules to compute out of place; the model's are set back
    (the instruments switch them for their passes, :func:`backend.out_of_place`), and the modules
    it adds to the model (its products with numbers, which the graph keeps) are taken off.
    """
    name = type(model).__name__
    in_place = [module for module in model.modules() if getattr(module, "inplace", None) is True]
    children = set(model._modules)
    try:
        with warnings.catch_warnings(), _as_leaves(blocks):
            warnings.simplefilter("ignore")  # the converter warns of what the checks below say
            traced = fx.GraphModule(model, BackpackTracer().trace(model))  # (its layers are the model's)
            operations = operations_as_layers(traced, CONVERTED)  # before the converter, which cannot take a function called twice
            left = unfollowed_operation(traced, CONVERTED)
            if left is not None:  # (said before the converter fails on it, in words of its own)
                return None, f"the model {name} {left}, which BackPACK's curvature rules cannot follow"
            with _as_leaves(operations):
                graph = convert_module_to_backpack(traced, False)
    except Exception as error:  # noqa: BLE001 - torch.fx's reasons are many (control flow that depends on the data, ...)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"BackPACK's converter cannot trace the model {name} ({type(error).__name__}: {first_line})"
    finally:
        for module in in_place:
            module.inplace = True
        for added in set(model._modules) - children:  # (the converter registers its modules on the model it gets)
            delattr(model, added)
    _self_attention_as_layers(graph)
    for node in graph.graph.nodes:
        if node.op not in ("call_module", "placeholder", "output"):
            target = getattr(node.target, "__name__", str(node.target))
            if node.op == "get_attr":  # a parameter (or buffer) used beside the layers
                return None, f"the model {name} uses its tensor '{target}' outside a layer, which BackPACK's curvature rules cannot follow"
            return None, f"the model {name} computes '{target}' outside a module, which BackPACK's curvature rules cannot follow"
    for node in graph.graph.nodes:
        if node.op == "call_module":
            module = graph.get_submodule(node.target)
            obstacle = curvature_obstacle(node.target, module, curvature, whole=True)
            if obstacle is not None and isinstance(module, SelfAttention):  # in the words of the model's own layer
                obstacle = obstacle.replace(f"layer '{node.target}' (SelfAttention)", f"layer '{module.name}' (MultiheadAttention)")
            if obstacle is None and type(module) not in curvature_layers(curvature) and len(node.args) + len(node.kwargs) != 1:
                obstacle = f"layer '{node.target}' ({type(module).__name__}) takes several inputs, which the curvature's rules of a layer BackPACK does not know cannot follow"
            if obstacle is not None:
                return None, obstacle
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for p in graph.parameters()):
        return None, f"BackPACK's converter copies a layer of the model {name}, whose copy the curvature would describe"
    return graph, None
