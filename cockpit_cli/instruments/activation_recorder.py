"""Statistics of layer outputs during a tracked step's forward pass (for Activations).

Forward hooks on every activation module and every leaf module with parameters sum each output's
elements, squares and zeros while recording is on (only on steps where Activations is due). The
sums are combined across data-parallel processes before they become the mean, standard deviation
and zero fraction of the global batch's outputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from cockpit_cli.instruments.model_hooks import ModelHook
from cockpit_cli.instruments.moments import mean_and_std, output_moments
from cockpit_cli.instruments.sync import Synchronizer

ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.GELU, nn.SiLU)


class ActivationRecorder:
    """Records output moments of the watched layers of ``model`` between :meth:`start` and :meth:`statistics`.

    The forward hooks are installed by :meth:`start` and stay for the following recorded steps;
    :meth:`remove` takes them off for steps that record nothing.

    Args:
        model: The network.
        sync: Combines the processes' sums (default: one process).
        ignore: Returns whether the current forward pass is one of the engine's own (not recorded).
    """

    def __init__(self, model: nn.Module, sync: Synchronizer, ignore: Callable[[], bool]):
        self.sync = sync
        self.ignore = ignore
        self.moments: dict[str, tuple[Tensor, int]] | None = None  # module name -> ([sum, sum of squares, nonzeros], count)
        self.layers = watched_layers(model)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def start(self) -> None:
        """Record the coming forward pass (installing the hooks if they are off)."""
        if not self.handles:
            self.handles = [module.register_forward_hook(ModelHook(self._hook(name))) for name, module in self.layers]
        self.moments = {}

    def stop(self) -> None:
        """Drop what was recorded and record nothing until :meth:`start`."""
        self.moments = None

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if self.moments is None or self.ignore() or not isinstance(output, Tensor):
                return
            moments, count = output_moments(output.detach()), output.numel()
            if name in self.moments:  # a layer that runs more than once: all its outputs of the pass
                earlier, earlier_count = self.moments[name]
                moments, count = earlier + moments, earlier_count + count
            self.moments[name] = (moments, count)

        return record

    def statistics(self) -> dict[str, dict[str, float]] | None:
        """Return ``{layer: {mean, std, zero_fraction}}`` over the global batch (``None`` when not recording)."""
        if self.moments is None:
            return None
        names = sorted(self.moments)
        if not names:
            return {}
        moments = torch.stack([self.moments[name][0] for name in names])  # [layers, 3]
        counts = [float(self.moments[name][1]) for name in names]
        if self.sync.world_size > 1:  # the counts are combined with the sums, in one collective
            sums = self.sync.sum(torch.cat([moments, moments.new_tensor(counts).unsqueeze(1)], dim=1)).tolist()
        else:
            sums = [[*row, count] for row, count in zip(moments.tolist(), counts)]
        statistics = {}
        for name, (total, squares, nonzeros, count) in zip(names, sums):
            mean, std = mean_and_std(total, squares, count)
            statistics[name] = {"mean": mean, "std": std, "zero_fraction": (count - nonzeros) / max(count, 1.0)}
        return statistics

    def remove(self) -> None:
        """Stop recording and remove the hooks (:meth:`start` installs them again)."""
        self.moments = None
        for handle in self.handles:
            handle.remove()
        self.handles = []


def watched_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules whose outputs are worth watching: activations and layers with parameters."""
    chosen = []
    for name, module in model.named_modules():
        if list(module.children()) or not name:
            continue
        if isinstance(module, ACTIVATION_MODULES) or any(p.requires_grad for p in module.parameters(recurse=False)):
            chosen.append((name, module))
    return chosen
