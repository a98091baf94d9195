"""How often each layer ran in a tracked forward pass, and parameters used outside their layers.

Per-sample gradients taken from a layer's inputs and output gradients (BackPACK's rules, the
hooks of :mod:`output_hooks`) see a parameter only where its layer runs. BackPACK keeps one
input per layer, so a layer that runs twice defeats it; the output hooks add up a layer's runs.
Neither sees a parameter that the loss uses directly (``x @ self.embed.weight.T``, a weight
tied that way, or a penalty on the weights): its part of every sample's gradient would be
missing (the capture then takes per-sample gradients from torch.func, and a penalty's gradient
is added to every sample's).

:class:`LayerRuns` counts the runs of the layers with tracked parameters while it watches, and
reads the uses of each parameter in the loss's autograd graph: every run of a Linear,
convolution or Embedding layer adds one edge into its parameters' gradient accumulators (the
regulariser one more). Such a layer's runs for the loss are its edges (a forward pass the loss
does not take, an evaluation with gradients on, does not count), and more edges than counted
runs mean a use outside the layer.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from cockpit_cli.instruments.model_hooks import ModelHook

# Layers whose every run adds exactly one edge into each parameter's gradient accumulator.
ONE_EDGE_PER_RUN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class LayerRuns:
    """Counts the runs of the layers that hold tracked parameters.

    Args:
        model: The network (for layer names).
        module_params: For each layer, its tracked parameters with their positions.
        names: The tracked parameters' names, by position.
    """

    def __init__(self, model: nn.Module, module_params: dict[nn.Module, list[tuple[int, nn.Parameter]]], names: list[str]):
        self.model = model
        self.module_params = module_params
        self.names = names
        self.runs: dict[nn.Module, int] = {}
        self.outside: set[int] = set()  # positions of the parameters used outside their layers (see used_outside)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def watch(self) -> None:
        """Count the runs of the coming forward passes (until :meth:`stop`)."""
        if not self._handles:
            self._handles = [module.register_forward_hook(ModelHook(self._count)) for module in self.module_params]

    @property
    def watching(self) -> bool:
        """Whether the runs of the last forward pass were counted (:meth:`watch` came before it)."""
        return bool(self._handles)

    def stop(self) -> None:
        """Stop counting and forget the counts."""
        if self._handles or self.runs:  # (called after every backward pass, mostly with nothing to do)
            for handle in self._handles:
                handle.remove()
            self._handles, self.runs = [], {}

    def _count(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if torch.is_grad_enabled():
            self.runs[module] = self.runs.get(module, 0) + 1

    def run_twice(self, edges: dict[int, int], decayed: Collection[int]) -> str | None:
        """Say which layer ran more than once for the loss, or return ``None``.

        A Linear, convolution or Embedding layer's runs are its ``edges`` in the loss's graph
        (:func:`accumulation_edges`; the regulariser of the positions ``decayed`` once more): a
        forward pass whose output the loss does not take (an evaluation with gradients on,
        between steps) is none of them. Other layers' runs are those counted since :meth:`watch`."""
        for module, own in self.module_params.items():
            if isinstance(module, ONE_EDGE_PER_RUN):
                runs = max(edges.get(id(param), 0) - (index in decayed) for index, param in own)
            else:
                runs = self.runs.get(module, 0)
            if runs > 1:
                return f"layer '{self._name(module)}' ({type(module).__name__}) runs {runs} times in a forward pass"
        return None

    def used_outside(self, edges: dict[int, int], decayed: Collection[int]) -> str | None:
        """Say which parameter of a Linear, convolution or Embedding layer the loss uses more often
        (its ``edges`` in the loss's graph, :func:`accumulation_edges`) than its layers ran (the regulariser of the positions ``decayed`` once more), or return
        ``None``; :attr:`outside` then holds the positions of every such parameter. Parameters of
        other layers, whose runs may add several edges, are not judged."""
        owners: dict[int, tuple[nn.Parameter, list[nn.Module]]] = {}
        for module, own in self.module_params.items():
            for index, param in own:
                owners.setdefault(index, (param, []))[1].append(module)
        found = []
        for index, (param, modules) in owners.items():
            if not all(isinstance(module, ONE_EDGE_PER_RUN) for module in modules):
                continue
            runs = sum(self.runs.get(module, 0) for module in modules) + (index in decayed)
            if edges.get(id(param), 0) > runs:
                found.append((index, " or ".join(f"'{self._name(module)}'" for module in modules)))
        self.outside = {index for index, _ in found}
        if not found:
            return None
        index, layers = found[0]
        return f"parameter '{self.names[index]}' is used outside its layer {layers} (by a term of the loss, as a penalty on the weights, or by a functional call, as a tied weight)"

    def _name(self, module: nn.Module) -> str:
        name = next((n for n, m in self.model.named_modules() if m is module), None)
        return name or type(module).__name__


def accumulation_edges(loss: Tensor) -> dict[int, int]:
    """Return, by ``id``, for each leaf tensor that ``loss`` depends on, the edges into its
    gradient accumulator in the autograd graph (one per operation that takes it, or a view of it)."""
    edges: dict[int, int] = {}
    seen: set[object] = set()
    pending = [loss.grad_fn] if loss.grad_fn is not None else []
    while pending:
        node = pending.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)
            if leaf is not None:
                edges[id(leaf)] = edges.get(id(leaf), 0) + 1
            elif child not in seen:
                seen.add(child)
                pending.append(child)
    return edges
