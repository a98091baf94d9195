"""Curvature diagonals of models that are no ``nn.Sequential``, through BackPACK's converter.

BackPACK backpropagates a curvature factor through a chain of layers. Its converter traces a
model with ``torch.fx`` into a graph of modules, in which the additions of residual connections,
products with numbers, flattening and in-place operations become modules with rules of their
own; its generalised Gauss-Newton extensions (exact and Monte-Carlo) follow such a graph, and
so does the Hessian's with the rules of :mod:`graph_hessian`. The graph calls the model's own layers, whose parameters are the training's
tensors, so a forward and a backward pass through it at a tracked step give the model's GGN
diagonal (and BackPACK's per-sample gradients beside it).

A model the converter cannot trace (control flow that depends on the data, a layer with
parameters called twice) or one that calls an operation outside a module (``torch.relu``
instead of ``nn.ReLU``) gets no curvature diagonal, with the reason.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

from backpack.custom_module.graph_utils import convert_module_to_backpack
from torch import fx, nn

from cockpit_cli.instruments.autograd_layers import autograd_obstacle
from cockpit_cli.instruments.curvature_diagonal import curvature_extension, settings_obstacle
from cockpit_cli.instruments.extension_rules import module_rules
from cockpit_cli.instruments.factored_batch_grad import factored_batch_grad


def extension_modules(extension: object) -> set[type]:
    """Return the module classes a BackPACK extension has rules for."""
    return set(module_rules(extension))


@lru_cache(maxsize=None)
def curvature_layers(curvature: str) -> dict[type, object]:
    """Return the rules, by layer class, that the instruments take for ``curvature`` (one dict per
    curvature: not to be changed)."""
    return module_rules(curvature_extension(curvature))


def curvature_obstacle(name: str, module: nn.Module, curvature: str) -> str | None:
    """Why the rules of ``curvature`` do not follow the layer ``name``, or ``None``."""
    kind, rules = type(module).__name__, curvature_layers(curvature)
    if type(module) not in rules:  # a layer without parameters: autograd's rules (autograd_layers)
        obstacle = autograd_obstacle(module)
        return None if obstacle is None else f"layer '{name}' ({kind}) {obstacle}"
    setting = settings_obstacle(rules[type(module)], module)
    return None if setting is None else f"layer '{name}' ({kind}) has settings BackPACK's curvature rule does not cover ({setting})"


def curvature_graph(model: nn.Module, curvature: str) -> tuple[fx.GraphModule | None, str | None]:
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the converter warns of what the checks below say
            graph = convert_module_to_backpack(model, False)
    except Exception as error:  # noqa: BLE001 - torch.fx's reasons are many (control flow that depends on the data, ...)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"BackPACK's converter cannot trace the model {name} ({type(error).__name__}: {first_line})"
    finally:
        for module in in_place:
            module.inplace = True
        for added in set(model._modules) - children:  # the converter registers its products with numbers on the model itself
            delattr(model, added)
    for node in graph.graph.nodes:
        if node.op not in ("call_module", "placeholder", "output"):
            target = getattr(node.target, "__name__", str(node.target))
            return None, f"the model {name} computes '{target}' outside a module, which BackPACK's curvature rules cannot follow"
    sample_rules = extension_modules(factored_batch_grad())
    for node in graph.graph.nodes:
        if node.op == "call_module":
            module = graph.get_submodule(node.target)
            trainable = any(p.requires_grad for p in module.parameters(recurse=False))
            obstacle = curvature_obstacle(node.target, module, curvature)
            if obstacle is None and type(module) not in curvature_layers(curvature) and len(node.args) + len(node.kwargs) != 1:
                obstacle = f"layer '{node.target}' ({type(module).__name__}) takes several inputs, which the curvature's rules of a layer without parameters cannot follow"
            if obstacle is None and trainable and type(module) not in sample_rules:
                obstacle = f"layer '{node.target}' ({type(module).__name__}) has no BackPACK rule for its per-sample gradients, which the pass through BackPACK's graph takes with the curvature"
            if obstacle is not None:
                return None, obstacle
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for p in graph.parameters()):
        return None, f"BackPACK's converter copies a layer of the model {name}, whose copy the curvature would describe"
    return graph, None
