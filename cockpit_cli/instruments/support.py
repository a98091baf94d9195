"""Which instruments a model supports: BackPACK, the torch.func fallback, or neither.

Per-sample gradients exist only when samples do not interact: a BatchNorm layer in training
mode mixes the samples of a batch, so per-sample quantities are unavailable there (in eval
mode, with its running statistics, it is a fixed affine map of each sample, which BackPACK
follows). Layers BackPACK has no first-order rule for fall back to ``torch.func`` (exact,
slower), as do convolutions that pad with their own values (circular, reflect, replicate),
which BackPACK's rules compute as if they padded with zeros; the curvature diagonal needs
second-order rules for every layer of a sequential model, or of BackPACK's graph of another
(:mod:`curvature_graph`), and a cross-entropy, binary cross-entropy (with logits),
mean-squared-error or robust regression (Huber, smooth L1, L1) loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cockpit_cli.instruments.convolutions import numeric_padding, unfoldable
from cockpit_cli.instruments.curvature_diagonal import settings_obstacle
from cockpit_cli.instruments.extension_rules import module_rules
from cockpit_cli.instruments.curvature_graph import WHOLE_NOTE, curvature_graph, curvature_obstacle, whole_model_graph
from cockpit_cli.instruments.factored_batch_grad import factored_batch_grad
from cockpit_cli.instruments.output_hooks import hooked_layer

PerSampleBackend = Literal["backpack", "functorch"]
GRAPH_IN_PARALLEL = (
    "the model {name} is no nn.Sequential of layers BackPACK's rules follow one by one, and in a data-parallel run its curvature diagonal would need a pass "
    "through BackPACK's graph of it outside the data-parallel wrapper"
)
PRODUCTS_MOST = 256  # trainable parameters whose Hessian diagonal may come from one Hessian-vector product each
PRODUCTS_NOTE = (
    "the Hessian diagonal comes from {count} Hessian-vector products, one per parameter, at each step with HessTrace or "
    "TIC due: BackPACK's rules do not follow this model ({reason})"
)
CURVATURE_LOSSES = (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.MSELoss, nn.HuberLoss, nn.SmoothL1Loss, nn.L1Loss)


@dataclass(frozen=True)
class Support:
    """What the instruments can compute for a model.

    Attributes:
        per_sample: How per-sample gradients are formed, or ``None`` if they do not exist.
        per_sample_reason: Why they are unavailable or slower, for the user (or ``None``).
        curvature: Whether BackPACK can compute curvature diagonals.
        curvature_reason: Why not (or ``None``).
        graph: BackPACK's graph of a model that is no nn.Sequential (:mod:`curvature_graph`),
            through which a pass of its own gives the curvature diagonals, or ``None``.
        curvature_by_products: Whether the Hessian diagonal comes from Hessian-vector products,
            one per parameter (a small model BackPACK's rules do not follow; ``curvature_reason``
            then says so).
    """

    per_sample: PerSampleBackend | None
    per_sample_reason: str | None
    curvature: bool
    curvature_reason: str | None
    graph: fx.GraphModule | None = field(default=None, repr=False, compare=False)
    curvature_by_products: bool = False

    @property
    def curvature_by_graph(self) -> bool:
        """Whether the curvature diagonals come from a pass through :attr:`graph` rather than
        from the training's backward pass."""
        return self.curvature and self.graph is not None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or type(model).__name__, module) for name, module in model.named_modules() if not list(module.children())]


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def check_support(model: nn.Module, loss_function: object, curvature: str = "hessian") -> Support:
    """Inspect ``model`` and ``loss_function`` and say which instruments are possible (the
    curvature diagonal ``curvature``: ``hessian``, ``ggn`` or ``ggn_mc``). Where BackPACK's rules
    give no Hessian diagonal, a model of at most :data:`PRODUCTS_MOST` trainable parameters gets
    it from Hessian-vector products (any loss, any layers)."""
    support = _backpack_support(model, loss_function, curvature)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    compiled = is_compiled(model)  # (its graph cannot be differentiated twice)
    if support.curvature or curvature != "hessian" or compiled or not 0 < count <= PRODUCTS_MOST:
        return support
    return replace(support, curvature=True, graph=None, curvature_by_products=True, curvature_reason=PRODUCTS_NOTE.format(count=count, reason=support.curvature_reason))


def _backpack_support(model: nn.Module, loss_function: object, curvature: str) -> Support:
    leaves = _leaves(model)
    mixing = mixing_batch_norm(model)
    if mixing is not None:
        name, module = mixing
        reason = mixing_reason(name, module) + " (in eval mode, normalising with its running statistics, it would treat every sample alone)"
        return Support(None, reason, False, f"layer '{name}' ({type(module).__name__}) has no curvature rule")
    counting = count_scaled_embedding(model)
    if counting is not None:
        reason = (
            f"layer '{counting}' (Embedding) scales its gradient by how often each id occurs in the batch (scale_grad_by_freq), "
            "so the batch's gradient is no mean of per-sample gradients; per-sample quantities are skipped"
        )
        return Support(None, reason, False, f"layer '{counting}' (Embedding) has no curvature rule")
    rules = module_rules(factored_batch_grad())
    if all(hooked_layer(m) for _, m in leaves if _has_trainable(m)):  # hooks on their outputs give them all (output_hooks)
        rules = {type(m): None for _, m in leaves if _has_trainable(m)}
    unsupported = [(n, m, _per_sample_obstacle(m, rules)) for n, m in leaves if _has_trainable(m)]
    unsupported = [entry for entry in unsupported if entry[2] is not None]
    holding = next(((name or type(model).__name__, m) for name, m in model.named_modules() if list(m.children()) and _has_trainable(m)), None)
    if holding is not None:  # BackPACK's rules are those of leaf layers
        unsupported.append((*holding, "has parameters beside its sublayers, which BackPACK's rules cannot follow"))
    per_sample: PerSampleBackend = "backpack"
    per_sample_reason = None
    if unsupported:
        name, module, obstacle = unsupported[0]
        per_sample = "functorch"
        per_sample_reason = f"layer '{name}' ({type(module).__name__}) {obstacle}; per-sample gradients use torch.func (exact, slower)"
    by_graph = not isinstance(model, nn.Sequential) or holding is not None  # (a layer with sublayers of its own is followed whole)
    curvature_possible, curvature_reason = _check_curvature(model, loss_function, leaves, curvature, by_graph)
    graph = None
    if curvature_possible and by_graph:
        graph, curvature_reason = curvature_graph(model, curvature)
        curvature_possible = graph is not None
    elif not curvature_possible and isinstance(loss_function, CURVATURE_LOSSES) and not is_compiled(model):
        graph = whole_model_graph(model, curvature)  # a layer of an nn.Sequential BackPACK's rules do not follow
        if graph is not None:
            curvature_possible, curvature_reason = True, WHOLE_NOTE.format(name=type(model).__name__, reason=curvature_reason)
    sharing = shared_parameters(model)
    if sharing is not None:
        # Hooks on the layers' outputs add up the runs of a Linear or convolution layer; BackPACK
        # keeps one input per layer and one per-sample gradient per layer and parameter.
        curvature_possible, curvature_reason = False, no_curvature_reason(sharing)
        if per_sample == "backpack" and not all(hooked_layer(m) for _, m in leaves if _has_trainable(m)):
            per_sample, per_sample_reason = "functorch", torch_func_reason(sharing)
    return Support(per_sample, per_sample_reason, curvature_possible, curvature_reason, graph if curvature_possible else None)


def mixing_batch_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """Return the first batch-norm layer of ``model`` (name and layer) that normalises with the
    statistics of the batch it is given, mixing its samples (training mode, or no running
    statistics kept), or ``None``. In eval mode with running statistics it is a fixed affine
    map of each sample."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats):
            return name or type(model).__name__, module
    return None


def count_scaled_embedding(model: nn.Module) -> str | None:
    """Return the name of the first trainable Embedding of ``model`` that divides its gradient
    by the counts of the ids in the batch (``scale_grad_by_freq``), or ``None``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq and module.weight.requires_grad:
            return name or type(model).__name__
    return None


def mixing_reason(name: str, module: nn.Module) -> str:
    """Why per-sample quantities are skipped where the batch-norm layer ``name`` mixes the samples."""
    return (
        f"layer '{name}' ({type(module).__name__}) mixes the samples of a batch (it normalises with the batch's "
        "statistics), so per-sample gradients do not exist; per-sample quantities are skipped"
    )


def shared_parameters(model: nn.Module) -> str | None:
    """Say where a trainable parameter serves more than one place in ``model`` (a layer registered
    twice, or layers that share a weight), or return ``None``."""
    layers: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _has_trainable(module):
            layers.setdefault(id(module), []).append(name or type(model).__name__)
    params: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            params.setdefault(id(param), []).append(name)
    for names in layers.values():
        if len(names) > 1:
            return f"layer '{names[0]}' appears {len(names)} times in the model (also as {', '.join(repr(n) for n in names[1:])})"
    for names in params.values():
        if len(names) > 1:
            return f"parameter '{names[0]}' is also {', '.join(repr(n) for n in names[1:])}"
    return None


def torch_func_reason(why: str) -> str:
    """The reason per-sample gradients come from torch.func because of ``why``."""
    return f"{why}, which BackPACK's rules cannot follow; per-sample gradients use torch.func (exact, slower)"


def no_curvature_reason(why: str) -> str:
    """The reason the curvature diagonals are left out because of ``why`` (a layer's runs or uses)."""
    return f"{why}; BackPACK's curvature rules need every layer once"


def _per_sample_obstacle(module: nn.Module, rules: dict[type, object]) -> str | None:
    """Why the per-sample rules (``rules``, by layer class; ``None`` where the output hooks
    follow the layer) cannot give the layer's per-sample gradients, or ``None``."""
    if type(module) not in rules:
        return "has no BackPACK rule"
    if _pads_with_copies(module):
        return f"pads in '{module.padding_mode}' mode, which BackPACK's rules compute as zero padding"
    setting = settings_obstacle(rules[type(module)], module)
    return None if setting is None else f"has settings BackPACK's rule does not cover ({setting})"


def _pads_with_copies(module: nn.Module) -> bool:
    """Whether a convolution pads with its own values (``padding_mode`` circular, reflect or
    replicate) where the instruments follow it with BackPACK's rules, which ignore the mode and
    compute with zero padding: grouped convolutions (:func:`convolutions.padded` covers the
    others)."""
    if getattr(module, "padding_mode", "zeros") == "zeros" or unfoldable(module):
        return False
    padding = numeric_padding(module)
    return padding is None or any(padding)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is what torch.compile returns."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def _check_curvature(model: nn.Module, loss_function: object, leaves: list[tuple[str, nn.Module]], curvature: str, by_graph: bool) -> tuple[bool, str | None]:
    if not isinstance(loss_function, CURVATURE_LOSSES):
        return False, f"the loss {type(loss_function).__name__} has no BackPACK curvature rule (needs CrossEntropyLoss, BCEWithLogitsLoss, MSELoss, HuberLoss, SmoothL1Loss or L1Loss)"
    if is_compiled(model):
        return False, "the model is compiled (torch.compile), which BackPACK's curvature rules cannot extend"
    if by_graph:
        name = type(model).__name__
        if mixing_batch_norm(model) is not None:  # a pass of its own would update the running statistics again
            return False, f"the model {name} is followed through BackPACK's graph of it and normalises with its batches' statistics"
        return True, None  # where BackPACK's converter can follow it, its graph's layers whole (check_support)
    first_trainable = next((i for i, (_, m) in enumerate(leaves) if _has_trainable(m)), len(leaves))
    for name, module in leaves[first_trainable:]:  # nothing before the first parameter is backpropagated
        obstacle = curvature_obstacle(name, module, curvature)
        if obstacle is not None:
            return False, obstacle
        if isinstance(getattr(module, "padding", None), str) and numeric_padding(module) is None:
            return False, f"layer '{name}' ({type(module).__name__}) pads 'same' unevenly (an even kernel extent), which BackPACK's curvature rules cannot backpropagate"
        if _pads_with_copies(module):
            return False, f"layer '{name}' ({type(module).__name__}) pads in '{module.padding_mode}' mode, which BackPACK's curvature rules compute as zero padding"
    return True, None
