"""The one backward pass of a tracked step, and the autograd tools quantities borrow.

:class:`GradientCapture` runs ``loss.backward()`` with the BackPACK extensions the due
quantities need (per-sample gradients and/or a curvature diagonal) and reduces each layer's
per-sample gradients inside BackPACK's extension hook. Those of Linear and convolution weights
stay factored and are formed a block of samples at a time (:mod:`factored_gradients`); other
layers' ``[N, ...]`` blocks are alive one at a time. Where every tracked parameter sits in a
Linear or convolution layer and no curvature is due, hooks on the layers' outputs hand over the
same factors without BackPACK (:mod:`output_hooks`). Models BackPACK cannot extend get
per-sample gradients from ``torch.func`` instead (:mod:`functional_passes`, which also gives the
Hessian-vector products and forward-mode slopes that quantities borrow through this class).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from typing import Any, Callable

import torch
from backpack import backpack, hook_run_extensions, hook_store_io, memory_cleanup
from backpack.utils.module_classification import is_no_op
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cockpit_cli.instruments.accumulator import Accumulator
from cockpit_cli.instruments.batch_inputs import Inputs
from cockpit_cli.instruments.batch_inputs import batch_size as samples_in
from cockpit_cli.instruments.autograd_layers import AUTOGRAD_RULES, unreproducible
from cockpit_cli.instruments.curvature_diagonal import CURVATURES, adds_residual, curvature_extension
from cockpit_cli.instruments.curvature_graph import graph_operations, whole_layers
from cockpit_cli.instruments.extension_rules import module_rules
from cockpit_cli.instruments.factored_batch_grad import factored_batch_grad
from cockpit_cli.instruments.factored_gradients import FactoredSamples
from cockpit_cli.instruments.functional_passes import (
    devices,
    diagonal_by_products,
    fused_attention_without_second_derivative,
    functorch_per_sample,
    hessian_vector_product,
    loss_at,
    per_sample_slopes,
    regularizer_slope,
    unchanged_state,
)
from cockpit_cli.instruments.layer_runs import LayerRuns, accumulation_edges
from cockpit_cli.instruments.loss_output_weight import LossModuleCalls
from cockpit_cli.instruments.loss_scale import scaled_loss
from cockpit_cli.instruments.model_hooks import ModelHook
from cockpit_cli.instruments.output_hooks import OutputGradientHooks, hooked_layer, layer_products
from cockpit_cli.instruments.per_sample_loss import PerSampleLoss
from cockpit_cli.instruments.reductions import NEEDS_CURVATURE, NEEDS_MEAN, NEEDS_SAMPLES, PROJECTIONS, ReductionOptions
from cockpit_cli.instruments.sample_pass import ConstantSamples, DenseSamples, SampleSource, reduce_layer, sample_failure
from cockpit_cli.instruments.support import Support, is_compiled, no_curvature_reason, torch_func_reason
from cockpit_cli.instruments.sync import Synchronizer
from cockpit_cli.instruments.torch_notices import quiet_notices


class GradientCapture:
    """Backward passes with per-layer fused reductions.

    Args:
        model: The network (extended in place for BackPACK when needed).
        loss_function: Mean-reduced loss ``(outputs, targets) -> scalar``.
        per_sample_loss_function: ``(outputs, targets) -> [N]`` data losses.
        params: Tracked (trainable) parameters, in order.
        names: Their names in ``model.named_parameters()``.
        support: What the model supports.
        curvature: ``"hessian"``, ``"ggn"`` or ``"ggn_mc"``.
        weight_decay: Per parameter, the L2 factor lambda of the regulariser
            ``0.5 * lambda * ||p||^2`` included in the loss (0 for undecayed parameters).
        sync: Combines the shards of data-parallel processes (default: one process). Each
            process then holds ``n = N / W`` samples; per-sample results are gathered to ``[N]``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_function: object,
        per_sample_loss_function: PerSampleLoss,
        params: list[nn.Parameter],
        names: list[str],
        support: Support,
        curvature: str,
        weight_decay: list[float],
        sync: Synchronizer | None = None,
    ):
        self.sync = sync or Synchronizer()
        self.model = model
        self.loss_function = loss_function
        self.per_sample_loss_function = per_sample_loss_function
        self.loss_calls = LossModuleCalls(loss_function)
        self.loss_weight = 1.0  # the factor of the loss module's output in the tracked step's loss (find_loss_weight)
        self.autocast = False  # whether the tracked step's forward pass ran under torch.autocast
        self.params = params
        self.names = names
        self.support = support
        self.curvature_attribute = CURVATURES[curvature][1]
        whole = whole_layers(support.graph) if support.graph is not None else []  # layers with sublayers the graph calls as one
        added = whole + graph_operations(support.graph) if support.graph is not None else []
        self._curvature = curvature_extension(curvature, model, added) if support.curvature and not support.curvature_by_products else None
        self._monte_carlo = curvature == "ggn_mc"
        self.weight_decay = weight_decay
        self.param_index = {id(p): i for i, p in enumerate(params)}
        self.module_params: dict[nn.Module, list[tuple[int, nn.Parameter]]] = {}
        for module in model.modules():
            own = [(self.param_index[id(p)], p) for p in module.parameters(recurse=False) if id(p) in self.param_index]
            if own:
                self.module_params[module] = own
        # a layer the graph calls as one reduces its sublayers' parameters (their hooks stay off)
        # (an operation of the forward may hold a parameter of the model too: tensor_operations)
        holding = whole + [operation for operation in graph_operations(support.graph) if any(True for _ in operation.parameters())] if support.graph is not None else []
        self._whole_params = {layer: [(self.param_index[id(p)], p) for p in layer.parameters() if id(p) in self.param_index] for layer in holding}
        self._inside_whole = {id(part) for layer in whole for part in layer.modules() if part is not layer}
        # BackPACK's hooks are installed only for the steps that use them (see attach): on the
        # other steps a full backward hook on every layer would cost time for nothing.
        self.extendable = [m for m in model.modules() if not is_no_op(m)] if support.per_sample == "backpack" or support.curvature else []
        if support.curvature and isinstance(loss_function, nn.Module):
            self.extendable.append(loss_function)
        # the layers whose curvature rules compute them again from their inputs (autograd_layers)
        rules = module_rules(self._curvature) if self._curvature is not None else {}
        self._recomputed = [m for m in self.extendable if isinstance(rules.get(type(m)), AUTOGRAD_RULES)]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._out_of_place: list[nn.Module] = []  # in-place modules computing out of place while BackPACK's hooks are on
        self._attached_for_curvature = False
        self._layer_names = {module: name or type(model).__name__ for name, module in model.named_modules()}
        self._rule_failures: list[str] = []  # of BackPACK's rules, in the last pass with them
        self.per_sample_by_jacobian = False  # torch.func's per-sample gradients from the batch's Jacobian (vmap failed)
        # Whether every tracked parameter sits in a layer whose output hooks give its per-sample
        # gradients (output_hooks.hooked_layer: Linear and convolution weights kept factored, the
        # others small blocks): products G[i] . v then cost about a forward pass of the layers.
        self.factored = support.per_sample == "backpack" and all(hooked_layer(m) for m in self.module_params)
        self._batch_grad = factored_batch_grad()  # built once: BatchGrad builds a rule for every layer type
        # Then, on steps without curvature, hooks on the layers' outputs give the same sources at less cost.
        self._output_hooks = OutputGradientHooks({m: [p for _, p in own] for m, own in self.module_params.items()}) if self.factored else None
        self.runs = LayerRuns(model, self.module_params, names)
        self._uses_checked = False  # whether a tracked step compared the parameters' uses with their layers' runs
        self.gradient_scale = 1.0  # that of the last backward pass: its gradients p.grad over the loss's
        self.compiled = is_compiled(model)
        # Whether Hessian-vector products differentiate a loss computed again with attention on
        # torch's math kernel (:meth:`products_on_math_attention`).
        self.math_attention = False
        self._forward_mode = True  # whether the model's operations have forward-mode derivatives (start_slopes)
        # BackPACK's graph of a model that is no nn.Sequential, for its curvature diagonal (curvature_graph)
        self._graph = support.graph if support.curvature_by_graph else None
        self._released_for_graph = False  # whether the last forward pass ran without hooks, for a pass through the graph
        self._diagonals: list[Tensor] | None = None  # the Hessian diagonal from products, during a pass (support.curvature_by_products)
        self._holding_diagonals = False  # the curvature rules' diagonals wait in _diagonals for torch.func's per-sample gradients
        self._hooks_paused = False  # while the products differentiate the graph before the training's backward pass

    def adds_curvature_residual(self, module: nn.Module) -> bool:
        """Whether the curvature's rule of ``module`` adds a factor of its own (the Hessian's at a
        layer with a second derivative, :func:`curvature_diagonal.adds_residual`)."""
        return self._curvature is not None and adds_residual(self._curvature, module)

    def may_use_torch_func(self, curvature: bool) -> bool:
        """Whether a coming tracked step's per-sample gradients may come from torch.func (which
        then replays the step's random state): always with that backend, and where :meth:`backward`
        may find that the layers' hooks cannot follow the model (the first tracked step, and
        passes of BackPACK: with curvature or through layers other than Linear and convolution)."""
        return self.support.per_sample == "functorch" or not self._uses_checked or curvature or not self.factored

    def count_runs(self) -> None:
        """Count the layers' runs in the coming forward pass where the parameters' uses are yet to
        be judged (:meth:`_unfollowable`), also for a pass without the layers' hooks (torch.func)."""
        if not self._uses_checked:
            self.runs.watch()

    def attach(self, curvature: bool) -> None:
        """Install BackPACK's hooks (what ``backpack.extend`` does), before a tracked forward pass.

        A curvature diagonal is backpropagated through every layer, which then keeps its input
        and output. Per-sample gradients alone need only the layers with tracked parameters, and
        of Linear and convolution layers only the inputs (see :func:`store_inputs`); where all of
        them are such layers, hooks on their outputs replace BackPACK's (see :mod:`output_hooks`).
        """
        self._released_for_graph = curvature and self._graph is not None
        if self._released_for_graph:  # the step's own pass is plain; a pass through the graph follows it
            self.release()
            return
        if not curvature and self._output_hooks is not None:
            if self._handles:
                self.detach()
            self._output_hooks.attach()
            if not self._uses_checked:
                self.runs.watch()
            return
        if self._output_hooks is not None:
            self._output_hooks.detach()
        if curvature and isinstance(self.loss_function, nn.Module):
            for stored in ("input0", "input1", "output"):  # so that its call at this step shows (see _curvature_obstacle)
                self.loss_function.__dict__.pop(stored, None)
        if self._handles and self._attached_for_curvature != curvature:
            self.detach()
        if not self._handles:
            self._attached_for_curvature = curvature
            modules = self.extendable if curvature else [m for m in self.extendable if m in self.module_params]
            for module in modules:
                store = hook_store_io if curvature or not isinstance(module, INPUT_ONLY) else store_inputs
                self._handles += [module.register_forward_hook(ModelHook(store)), module.register_full_backward_hook(ModelHook(self._run_extensions))]
            self._out_of_place = out_of_place(self.model)
        self.runs.watch()  # BackPACK keeps one input per layer: a layer that runs twice defeats it

    def _run_extensions(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        """:func:`run_extensions`, whose failure is recorded (``_rule_failures``) instead of
        raised: it would stop the training's backward pass, and the training with it."""
        if self._hooks_paused:  # the engine's own pass through the graph: the layer's input stays for the training's
            return
        try:
            run_extensions(module, grad_input, grad_output)
        except Exception as error:  # noqa: BLE001 - runs inside the backward pass, which must complete
            memory_cleanup(module)  # the layer's input and output, which the rule's end drops (a model holding them cannot be copied)
            for _, param in self.module_params.get(module, []):
                for attribute in ("grad_batch", self.curvature_attribute):
                    if hasattr(param, attribute):
                        delattr(param, attribute)
            name = self._layer_names.get(module, type(module).__name__)
            self._rule_failures.append(f"BackPACK's rule of layer '{name}' ({type(module).__name__}) failed: {type(error).__name__}: {error}")

    def detach(self) -> None:
        """Remove BackPACK's hooks again, after the tracked step's backward pass.

        The output hooks stay for the next tracked step: between steps they only mark the layers'
        outputs of forward passes with gradients, and act only inside :meth:`backward`.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._out_of_place:
            module.inplace = True
        self._out_of_place = []
        self.runs.stop()

    def release(self) -> None:
        """Remove every hook (for steps without per-sample gradients or curvature, and at the end)."""
        self.detach()
        if self._output_hooks is not None:
            self._output_hooks.detach()

    def find_loss_weight(self, loss: Tensor) -> float:
        """Find and return the factor ``w`` with which the loss module's output enters the
        tracked step's ``loss`` (:class:`LossModuleCalls`): the passes of the step that compute
        the loss again from the loss functions multiply by it, so that their values describe
        ``loss``."""
        self.loss_weight = self.loss_calls.weight(loss)
        return self.loss_weight

    def _per_sample_loss(self, weight: float) -> PerSampleLoss:
        """The per-sample loss function, its values times ``weight``."""
        function = self.per_sample_loss_function
        return function if weight == 1.0 else lambda outputs, targets: weight * function(outputs, targets)

    def regularization(self) -> float:
        """Return the regulariser's value ``sum_p 0.5 * lambda_p * ||p||^2``."""
        return float(self.regularization_tensor().detach())

    def regularization_tensor(self) -> Tensor:
        """Return the regulariser as a differentiable scalar tensor."""
        terms = [0.5 * wd * p.pow(2).sum() for p, wd in zip(self.params, self.weight_decay) if wd]
        return sum(terms) if terms else torch.zeros((), device=self.params[0].device if self.params else None)

    def backward(
        self,
        loss: Tensor,
        inputs: Inputs,
        targets: Any,
        requested: frozenset[str],
        per_sample: bool,
        curvature: bool,
        options: ReductionOptions,
        retain_graph: bool = False,
        rng_state: tuple | None = None,
        create_graph: bool = False,
        scale: float = 1.0,
    ) -> Accumulator:
        """Run ``(scale * loss).backward()`` and return the sums of the requested reductions of
        ``loss`` (global ones, combined across data-parallel processes).

        Args:
            loss: The mini-batch loss (scalar, with the regulariser).
            inputs: The batch ``[N, ...]``, or the tuple of the model's inputs (for the torch.func fallback).
            targets: Its targets ``[N, ...]``.
            requested: Reduction names (see :mod:`reductions`).
            per_sample: Whether per-sample gradients are needed.
            curvature: Whether the curvature diagonal is needed.
            options: Histogram ranges and projection direction.
            retain_graph: Keep the graph (for Hessian-vector products afterwards).
            rng_state: The random state right before the training forward (torch.func fallback).
            create_graph: Leave the gradients ``p.grad`` differentiable, so that
                :meth:`hessian_vector_product` needs no second backward pass; call
                :meth:`release_gradient_graph` when done. (The extensions' work is not recorded.)
            scale: The factor of the loss backpropagated, as a gradient scaler's (mixed
                precision: output gradients that would underflow float16 stay in its range);
                every value the pass hands over is divided by it. Not with the curvature
                extension, whose rules read the output gradients themselves.
        """
        if curvature and self._graph is not None:

            def training_pass() -> None:
                self.gradient_scale = scale
                _backward(scaled_loss(loss, scale), retain_graph, create_graph)

            return self._backward_by_graph(loss, inputs, targets, requested, per_sample, options, rng_state, training_pass)
        self.gradient_scale = scale
        loss = scaled_loss(loss, scale)
        accumulator = Accumulator(len(self.params))
        batch_size = samples_in(inputs)
        extensions = []
        by_products = curvature and self.support.curvature_by_products  # the Hessian diagonal from products (support.PRODUCTS_NOTE)
        if by_products:  # first, as the per-sample reductions take it with them
            self._diagonals = self._diagonal_by_products(accumulator, requested, loss, inputs, targets, rng_state)
            create_graph = create_graph and not self.products_by_replay  # (switched to attention's math kernel: the training's graph has no second derivative)
        by_output_hooks = per_sample and self._output_hooks is not None and self._output_hooks.attached
        # A pass planned through the graph whose curvature went off after the forward pass (its
        # memory estimate, :mod:`curvature_memory`) has no hooks that recorded it: torch.func then.
        by_functorch = per_sample and (self.support.per_sample == "functorch" or self._released_for_graph)
        own_gradients = self.sync.world_size == 1 and all(p.grad is None for p in self.params)  # the pass forms them from nothing
        if per_sample and self.support.per_sample == "backpack" and not by_output_hooks and not by_functorch:
            extensions.append(self._batch_grad)
        if curvature and self.support.curvature and not by_products:
            obstacle = self._curvature_obstacle(loss)
            if obstacle is None:
                extensions.append(self._curvature)
            else:
                accumulator.fail(requested & NEEDS_CURVATURE, obstacle)
        unfollowable = self._unfollowable(loss, per_sample, by_functorch, extensions)
        if unfollowable is not None:  # torch.func forms this step's per-sample gradients
            by_functorch = per_sample
            if self._curvature in extensions:
                accumulator.fail(requested & NEEDS_CURVATURE, no_curvature_reason(unfollowable))
            extensions, by_output_hooks = [], False
        self._hold_diagonals(by_functorch and self._curvature in extensions)
        if extensions:
            hook = self._hook(accumulator, requested, options, batch_size)
            fork = self._monte_carlo and curvature
            with torch.random.fork_rng(devices=devices(loss), enabled=fork):  # MC samples never touch training's RNG
                with backpack(*extensions, extension_hook=hook, retain_graph=retain_graph or create_graph), quiet_notices():
                    self._rule_failures = []
                    _backward(loss, retain_graph, create_graph)
            if self._rule_failures:  # the pass completed, its gradients whole; what the rules give is not (torch.func's are apart)
                accumulator.fail(requested & (NEEDS_CURVATURE if by_functorch else NEEDS_SAMPLES | NEEDS_CURVATURE), self._rule_failures[0])
        elif by_output_hooks:
            hooks = self._output_hooks
            if requested == {PROJECTIONS}:  # Alpha's second point alone: a layer's products in one pass
                hooks.layer_callback = self._layer_projections(accumulator, options)
            else:
                hooks.callback = self._parameter_hook(accumulator, requested, options, batch_size)
            # The training's own gradients are the means of the per-sample ones where they start
            # empty (not accumulated over several backward passes) and are this process's alone.
            # Only reductions that read the mean wait for them: the factors of a layer that waits
            # stay in memory beside its gradient.
            hooks.at_gradients = bool(requested & NEEDS_MEAN) and own_gradients
            hooks.after_gradient = self._release_direction(options, accumulator)
            try:
                _backward(loss, retain_graph, create_graph)
                hooks.flush()
            finally:
                hooks.callback, hooks.layer_callback, hooks.at_gradients, hooks.after_gradient = None, None, False, None
                hooks.flush()  # drops what a failed pass left
        else:
            with quiet_notices() if self._handles else nullcontext():  # BackPACK's hooks, attached, find no extension
                _backward(loss, retain_graph, create_graph)
        if (per_sample and not by_functorch) or (self._curvature in extensions and not self._holding_diagonals):
            self._reduce_unused(accumulator, requested, options, batch_size, per_sample and not by_functorch, self._curvature in extensions or by_products)
        if by_functorch:
            self._reduce_by_functorch(accumulator, inputs, targets, rng_state, requested, options, own_gradients)
        elif by_products and not per_sample and self._diagonals is not None:
            for index, param in enumerate(self.params):
                reduce_layer(index, None, param, self._diagonals[index], requested, accumulator, options, self.sync)
        self._diagonals, self._holding_diagonals = None, False
        accumulator.synchronize(self.sync)
        return accumulator

    def _diagonal_by_products(self, accumulator: Accumulator, requested: frozenset[str], loss: Tensor, inputs: Inputs, targets: Any, rng_state: tuple | None) -> list[Tensor] | None:
        """Return the Hessian diagonal of ``loss`` (the training's, with its regulariser), one
        Hessian-vector product per parameter, ``h_k = (H e_k)_k``, from gradients taken with a
        graph before the training's backward pass (which leaves the loss's graph for it), the
        layers' hooks waiting meanwhile; ``None`` where the products fail (the curvature
        quantities then go off with the reason). Where attention's fused kernels have no second
        derivative, the products are taken on the loss computed again with attention on the math
        kernel, from then on (:meth:`products_on_math_attention`)."""
        self._hooks_paused = True
        if self._output_hooks is not None:
            self._output_hooks.paused = True
        try:
            try:
                diagonals = self._products_diagonals(self.hessian_vector_product(loss, inputs, targets, rng_state))
            except RuntimeError as error:
                if self.math_attention or not fused_attention_without_second_derivative(str(error)):
                    raise
                self.products_on_math_attention()
                diagonals = self._products_diagonals(self.hessian_vector_product(loss, inputs, targets, rng_state))
        except Exception as error:  # noqa: BLE001 - the gradients are taken; the curvature quantities go off
            accumulator.fail(requested & NEEDS_CURVATURE, f"the Hessian-vector products failed: {type(error).__name__}: {error}")
            diagonals = None
        finally:
            self._hooks_paused = False
            if self._output_hooks is not None:
                self._output_hooks.paused = False
        return diagonals

    def _products_diagonals(self, product: Callable[..., list[Tensor]]) -> list[Tensor]:
        """Return ``(H e_k)_k`` for every parameter entry ``k``, shaped like the parameters: up to
        :data:`functional_passes.PRODUCTS_AT_ONCE` products in one batched pass (autograd's
        ``is_grads_batched``), one at a time where an operation cannot be batched."""

        def applied(index: int, units: Tensor) -> Tensor:
            vectors = [units if i == index else torch.zeros(len(units), *p.shape, dtype=p.dtype, device=p.device) for i, p in enumerate(self.params)]
            try:
                return product(vectors, batched=True)[index]
            except RuntimeError:  # (an operation vmap cannot batch)
                return torch.stack([product([vector[row] for vector in vectors])[index] for row in range(len(units))])

        return [diagonal_by_products(param.detach(), partial(applied, index)) for index, param in enumerate(self.params)]

    def _hold_diagonals(self, holding: bool) -> None:
        """Where ``holding``: torch.func's per-sample gradients come after the pass, and the
        curvature rules' diagonals wait for them in ``_diagonals`` (a parameter the pass does not
        reach has the regulariser's, lambda)."""
        self._holding_diagonals = holding
        if holding:
            self._diagonals = [torch.full_like(param.detach(), decay) for param, decay in zip(self.params, self.weight_decay)]

    def _products_diagonal(self, index: int) -> Tensor | None:
        """The curvature diagonal of parameter ``index`` held at this pass (from products, or the
        rules' held for torch.func's per-sample gradients), or ``None``."""
        return None if self._diagonals is None else self._diagonals[index]

    def _reduce_by_functorch(
        self,
        accumulator: Accumulator,
        inputs: Inputs,
        targets: Any,
        rng_state: tuple | None,
        requested: frozenset[str],
        options: ReductionOptions,
        own_gradients: bool,
        stand_in: bool = False,
    ) -> None:
        """Add the requested reductions of torch.func's per-sample gradients to ``accumulator``
        (after the training's backward pass). Where they do not average to the training's own
        gradients, the loss has a term the per-sample loss function misses (or the model mixes
        the samples): the quantities that read them go off, or skip this step alone where
        torch.func stands in for the layers' hooks (``stand_in``: BackPACK's graph failed), which
        follow every term of the loss."""
        self.detach()  # BackPACK's hooks, where they were attached, cannot run inside torch.func's transforms
        try:
            gradients = self._functorch_per_sample(inputs, targets, rng_state)
        except Exception as error:  # noqa: BLE001 - the gradients are taken; the quantities that need these go off
            accumulator.fail(requested & NEEDS_SAMPLES, sample_failure(error))
            gradients = []
        difference, size = 0.0, 0.0  # of the samples' means from the training's gradients, squared
        try:
            for index, samples in enumerate(gradients):
                samples = self._with_regularizer(index, samples)
                gradient = self.params[index].grad
                if own_gradients and gradient is not None:
                    gradient = gradient.detach() / self.gradient_scale
                    if index in self.runs.outside:
                        _add_loss_term(samples, gradient)
                    else:
                        difference = difference + (samples.mean(0) - gradient).double().pow(2).sum()
                        size = size + gradient.double().pow(2).sum()
                reduce_layer(index, DenseSamples(samples), self.params[index], self._products_diagonal(index), requested, accumulator, options, self.sync)
        except Exception as error:  # noqa: BLE001 - the training's gradients are in place; the quantities that need these go off
            accumulator.fail(requested & NEEDS_SAMPLES, sample_failure(error))
            return
        tolerance = _mean_tolerance(self.params[0].dtype if self.params else torch.float32, self.autocast)
        if float(difference) > tolerance**2 * float(size):  # (not with NaN: a diverged step is said elsewhere)
            times = "" if self.loss_weight == 1.0 else f" times {self.loss_weight:g}"
            reason = UNSEEN_LOSS_TERM.format(times=times, part=math.sqrt(float(difference) / float(size)))
            (accumulator.drop if stand_in else accumulator.fail)(requested & NEEDS_SAMPLES, reason)

    def _backward_by_graph(
        self, loss: Tensor, inputs: Inputs, targets: Any, requested: frozenset[str], per_sample: bool, options: ReductionOptions, rng_state: tuple | None, training_pass: Callable[[], None]
    ) -> Accumulator:
        """:meth:`backward` at a step with curvature of a model that is no nn.Sequential: a forward
        and a backward pass through BackPACK's graph of the model (:mod:`curvature_graph`), on the
        step's inputs with its random state, give the curvature diagonal and the per-sample
        gradients, while the training's gradients are set aside; then ``training_pass``, the
        training's backward pass, plain. The graph's loss must be the step's (the loss module's value, plus
        ``weight_decay``'s term): otherwise, as where the graph's pass fails, the curvature is
        switched off with the reason, and the step's per-sample gradients come from torch.func."""
        accumulator = Accumulator(len(self.params))
        batch_size = samples_in(inputs)
        own_gradients = self.sync.world_size == 1 and all(p.grad is None for p in self.params)
        set_aside = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        modules = [m for m in self._graph.modules() if not is_no_op(m) and id(m) not in self._inside_whole] + [self.loss_function]
        # Layers BackPACK has no per-sample rule for, or taken whole: torch.func's per-sample gradients after the pass, the diagonals waiting.
        by_functorch = per_sample and (self.support.per_sample != "backpack" or bool(self._whole_params))
        self._hold_diagonals(by_functorch)
        handles = [handle for m in modules for handle in (m.register_forward_hook(hook_store_io), m.register_full_backward_hook(run_extensions))]
        switched = out_of_place(self.model)
        self.gradient_scale = 1.0
        failure = None
        try:
            with torch.random.fork_rng(devices=devices(loss)):  # the replay and Monte-Carlo samples never touch training's RNG
                graph_loss = loss_at(self._graph, self.loss_function, inputs, targets, rng_state, weight=self.loss_weight)
                step_loss = float(loss.detach()) - self.regularization()
                if not self.loss_weight > 0:
                    failure = UNFACTORED_WEIGHT.format(weight=self.loss_weight)
                elif not math.isclose(float(graph_loss.detach()), step_loss, rel_tol=1e-5, abs_tol=1e-7):
                    failure = GRAPH_LOSS_MISMATCH.format(graph=float(graph_loss.detach()), step=step_loss, name=type(self.loss_function).__name__, weight=self.loss_weight)
                else:
                    extensions = [self._batch_grad, self._curvature] if per_sample and not by_functorch else [self._curvature]
                    # (unchanged_state: the rules that compute a layer again leave a spectral norm's power iteration alone)
                    with backpack(*extensions, extension_hook=self._hook(accumulator, requested, options, batch_size)), quiet_notices(), unchanged_state(self._graph):
                        graph_loss.backward()
        except Exception as error:  # noqa: BLE001 - the training's backward pass below must still run
            failure = f"the pass through BackPACK's graph of the model failed: {type(error).__name__}: {error}"
        finally:
            for handle in handles:
                handle.remove()
            for module in switched:
                module.inplace = True
            for p, gradient in zip(self.params, set_aside):
                p.grad = gradient
        training_pass()
        if failure is not None:  # what the graph's pass summed is dropped; torch.func gives the per-sample values
            accumulator = Accumulator(len(self.params))
            self._diagonals, self._holding_diagonals = None, False
            self._graph = None
            self._learn(failure, per_sample=False, curvature=True)
            accumulator.fail(requested & NEEDS_CURVATURE, failure)
            if per_sample:
                stand_in = self.support.per_sample == "backpack"  # (the layers' hooks give them at the other steps)
                self._reduce_by_functorch(accumulator, inputs, targets, rng_state, requested, options, own_gradients, stand_in)
        elif by_functorch:
            self._reduce_by_functorch(accumulator, inputs, targets, rng_state, requested, options, own_gradients)
        else:
            self._reduce_unused(accumulator, requested, options, batch_size, per_sample, curvature=True)
        self._diagonals, self._holding_diagonals = None, False
        accumulator.synchronize(self.sync)
        return accumulator

    def _curvature_obstacle(self, loss: Tensor) -> str | None:
        """Say why BackPACK's curvature backpropagation cannot start from the loss module at this
        step, or return ``None``. It starts at the module's last call since :meth:`attach`
        prepared the step (BackPACK's hook stored its inputs and output), which must be part of
        ``loss``, with a positive factor (the gradient that reaches the module's output: the
        curvature rules scale by its square root, :mod:`loss_output_weight`)."""
        module = self.loss_function
        if not isinstance(module, nn.Module):
            return None
        name = type(module).__name__
        if "input0" not in module.__dict__:
            return LOSS_NOT_FROM_MODULE.format(name=name)
        output = module.__dict__.get("output")
        if not isinstance(output, Tensor) or output.numel() != 1 or not loss.requires_grad:
            return None  # (BackPACK's rules take a scalar output; a loss without gradients is the caller's mistake)
        weight = torch.autograd.grad(loss, output, retain_graph=True, allow_unused=True)[0] if output.requires_grad else None
        if weight is None:
            return LOSS_NOT_FROM_LAST_CALL.format(name=name)
        if not float(weight) > 0:
            return UNFACTORED_WEIGHT.format(weight=float(weight))
        for layer in self._recomputed:
            if "input0" in layer.__dict__:
                why = unreproducible(layer)
                if why is not None:
                    return f"layer '{self._layer_names.get(layer, type(layer).__name__)}' ({type(layer).__name__}): {why}"
        return None

    def _reduce_unused(self, accumulator: Accumulator, requested: frozenset[str], options: ReductionOptions, batch_size: int, per_sample: bool, curvature: bool) -> None:
        """Reduce the parameters the pass did not reach: those the loss did not use at this step
        (a layer the forward pass skipped), whose gradient is the same for every sample, the
        regulariser's (zero without one), as torch.func and autograd give it, and whose
        curvature diagonal is the regulariser's, ``lambda`` (``per_sample``, ``curvature``: which
        of the two the pass formed)."""
        if len(accumulator.reached) == len(self.params):
            return
        for index, param in enumerate(self.params):
            if index not in accumulator.reached:
                shared = self._with_regularizer(index, torch.zeros_like(param.detach())) if per_sample else None
                diagonal = torch.full_like(param.detach(), self.weight_decay[index]) if curvature else None
                source = None if shared is None else ConstantSamples(shared, batch_size)
                reduce_layer(index, source, param, diagonal, requested, accumulator, options, self.sync)

    def _unfollowable(self, loss: Tensor, per_sample: bool, by_functorch: bool, extensions: list) -> str | None:
        """Say why the layers' hooks cannot follow this step's forward pass (:mod:`layer_runs`), or
        return ``None``; where that holds for later steps too, :meth:`_learn` it.

        Once, at the first tracked step with per-sample gradients: a parameter used outside its
        layers, which no hook sees (with torch.func already, it only marks the parameters whose
        loss term every sample shares). At a pass of BackPACK (``extensions``): a layer that ran
        twice, as BackPACK keeps one input per layer (the output hooks add up a layer's runs:
        models of Linear and convolution layers keep them for steps without curvature).
        """
        check_uses = per_sample and not self._uses_checked and self.runs.watching  # judged where the runs were counted
        if not (check_uses or extensions):
            return None
        edges = accumulation_edges(loss)  # the graph, walked once for both judgements
        decayed = [i for i, decay in enumerate(self.weight_decay) if decay]
        if check_uses:
            self._uses_checked = True
            outside = self.runs.used_outside(edges, decayed)
            if outside is not None and not by_functorch:
                self._learn(outside, per_sample=True, curvature=self._curvature in extensions)
                return outside
        run_twice = self.runs.run_twice(edges, decayed) if extensions else None
        if run_twice is not None:
            self._learn(run_twice, per_sample=self._batch_grad in extensions and not self.factored, curvature=self._curvature in extensions)
        return run_twice

    def _learn(self, reason: str, per_sample: bool, curvature: bool) -> None:
        """Take per-sample gradients from torch.func (``per_sample``) and give up the curvature
        diagonal (``curvature``) from now on, because of ``reason`` (:mod:`layer_runs`)."""
        support = self.support
        if per_sample:
            support = replace(support, per_sample="functorch", per_sample_reason=torch_func_reason(reason))
            self.factored = False
        if curvature:
            support = replace(support, curvature=False, curvature_reason=no_curvature_reason(reason))
        self.support = support

    def _hook(self, accumulator: Accumulator, requested: frozenset[str], options: ReductionOptions, batch_size: int) -> Callable[[nn.Module], None]:
        def reduce_module(module: nn.Module) -> None:
            for index, param in self._whole_params.get(module) or self.module_params.get(module, []):
                diagonal = getattr(param, self.curvature_attribute, None)
                if diagonal is not None and self.weight_decay[index]:
                    diagonal = diagonal + self.weight_decay[index]
                elif diagonal is None:
                    diagonal = self._products_diagonal(index)
                if self._holding_diagonals:
                    if diagonal is not None:
                        self._diagonals[index] = diagonal
                else:
                    source = self._source(index, getattr(param, "grad_batch", None), batch_size)
                    reduce_layer(index, source, param, diagonal, requested, accumulator, options, self.sync)
                for attribute in ("grad_batch", self.curvature_attribute):
                    if hasattr(param, attribute):
                        delattr(param, attribute)

        return reduce_module

    def _parameter_hook(self, accumulator: Accumulator, requested: frozenset[str], options: ReductionOptions, batch_size: int) -> Callable[[nn.Module, nn.Parameter, Tensor | FactoredSamples, Tensor | None], None]:
        def reduce_source(module: nn.Module, param: nn.Parameter, samples: Tensor | FactoredSamples, mean: Tensor | None) -> None:
            index = self.param_index[id(param)]
            if mean is not None and self.gradient_scale != 1.0:
                mean = mean / self.gradient_scale
            reduce_layer(index, self._source(index, samples, batch_size), param, self._products_diagonal(index), requested, accumulator, options, self.sync, mean=mean)

        return reduce_source

    def _layer_projections(self, accumulator: Accumulator, options: ReductionOptions, theta: list[Tensor] | None = None) -> Callable[[nn.Module, Tensor, Tensor], None]:
        """Return what adds a layer's products ``G[i] . u`` (weight and bias together, with the
        regulariser's ``lambda theta . u``, at ``theta`` where given, else at the parameters) to
        the PROJECTIONS of ``accumulator``; a failure is recorded there
        (:meth:`Accumulator.fail`), as :func:`sample_pass.reduce_layer` records its own."""

        def project(module: nn.Module, inputs: Tensor, grad_output: Tensor) -> None:
            own = self.module_params[module]
            try:
                directions = {param: options.direction[index].to(param.dtype) for index, param in own}  # tensors hash by identity
                products = layer_products(module, inputs, grad_output, directions.get(module.weight), directions.get(getattr(module, "bias", None)))
                products.mul_(inputs.shape[0] / self.gradient_scale)  # scale g_i / N -> g_i
                for index, param in own:
                    if self.weight_decay[index] and index not in accumulator.sourced:  # every G[i] holds lambda theta, once however often the layer runs
                        point = param.detach() if theta is None else theta[index]
                        products += self.weight_decay[index] * torch.dot(point.reshape(-1), directions[param].reshape(-1))
                accumulator.sourced.update(index for index, _ in own)
                accumulator.reached.update(index for index, _ in own)
                accumulator.add(PROJECTIONS, products)
            except Exception as error:  # noqa: BLE001 - runs inside the backward pass, which must complete
                accumulator.fail({PROJECTIONS}, sample_failure(error))

        return project

    def _release_direction(self, options: ReductionOptions, accumulator: Accumulator) -> Callable[[nn.Parameter], None] | None:
        """Return what drops a parameter's part of the projection direction once its products are
        taken (the direction is the last step's update, as large as the parameters: released layer
        by layer, it is not whole in memory beside the gradients at the end of the pass). A
        parameter no layer run took (:meth:`_reduce_unused`) keeps it."""
        if options.direction is None:
            return None

        def release(param: nn.Parameter) -> None:
            index = self.param_index[id(param)]
            if index in accumulator.sourced:
                options.direction[index] = None

        return release

    def _source(self, index: int, samples: Tensor | FactoredSamples | None, batch_size: int) -> SampleSource | None:
        """Return the per-sample gradients of parameter ``index`` (with the regulariser) from BackPACK's ``grad_batch``."""
        if samples is None:
            return None
        if isinstance(samples, FactoredSamples):
            if self.gradient_scale != 1.0:
                samples.unscale(self.gradient_scale)
            return samples.regularized(self.params[index], self.weight_decay[index])
        dtype = self.params[index].dtype
        # BackPACK gives scale g_i / N (in half precision under autocast)
        samples = (samples if samples.dtype == dtype else samples.to(dtype)) * (batch_size / self.gradient_scale)
        return DenseSamples(self._with_regularizer(index, samples))  # a copy, as it may alias the layer's output gradient

    def _with_regularizer(self, index: int, samples: Tensor) -> Tensor:
        """Add the regulariser's gradient lambda * p (the same for every sample) in place."""
        decay = self.weight_decay[index]
        return samples.add_(self.params[index].detach(), alpha=decay) if decay else samples

    def _functorch_per_sample(self, inputs: Inputs, targets: Any, rng_state: tuple | None, theta: list[Tensor] | None = None, weight: float | None = None) -> list[Tensor]:
        """Per-sample data-loss gradients from ``torch.func``, one ``[N, *p.shape]`` per parameter
        (:func:`functional_passes.functorch_per_sample`), at the parameters or at ``theta``; of
        the per-sample losses times ``weight`` (default: the step's :attr:`loss_weight`)."""
        points = self.params if theta is None else theta
        params = {name: point.detach() for name, point in zip(self.names, points)}
        per_sample_loss = self._per_sample_loss(self.loss_weight if weight is None else weight)
        arguments = (self.model, params, per_sample_loss, inputs, targets, rng_state)
        try:
            gradients = functorch_per_sample(*arguments, by_jacobian=self.per_sample_by_jacobian)
        except RuntimeError as error:  # an operation vmap cannot run a sample at a time: its Jacobian vmaps only backward passes
            if self.per_sample_by_jacobian:
                raise
            try:
                gradients = functorch_per_sample(*arguments, by_jacobian=True)
            except Exception:
                raise error from None  # the first failure says more than the second
            self.per_sample_by_jacobian = True
        return [_own_memory(gradients[name]) for name in self.names]

    @property
    def products_by_replay(self) -> bool:
        """Whether :meth:`hessian_vector_product` computes the step's loss again (so the training's
        backward pass need not keep its gradients differentiable)."""
        return self.compiled or self.math_attention

    def products_on_math_attention(self) -> None:
        """From now on, take Hessian-vector products of the loss computed again with attention on
        torch's math kernel: the fused kernels torch picks for ``scaled_dot_product_attention``
        (flash attention, on the CPU too) have no second derivative. The training's own forward
        passes keep their kernels."""
        self.release_gradient_graph()  # the gradients of the training's graph, which cannot be differentiated again
        self.math_attention = True

    def hessian_vector_product(self, loss: Tensor, inputs: Inputs, targets: Any, rng_state: tuple | None) -> Callable[[list[Tensor]], list[Tensor]]:
        """Return ``v -> H v`` for the Hessian of ``loss``, whose graph must still exist
        (:func:`functional_passes.hessian_vector_product`; it differentiates the gradients
        :meth:`backward` left differentiable with ``create_graph``). Call it inside the engine's
        own pass (the hooks ignore a forward pass it makes).

        Where the training's graph cannot be differentiated twice (:attr:`products_by_replay`: a
        compiled model's graph, or attention's fused kernels), the loss is computed again, by the
        module torch.compile wraps and with attention on the math kernel, from the step's inputs
        and random state, and must equal the step's loss (the loss module's value plus the
        regulariser)."""
        if self.products_by_replay:
            loss = self._replayed_loss(loss, inputs, targets, rng_state)
        return hessian_vector_product(loss, self.params, self.sync, self.gradient_scale)

    def _replayed_loss(self, loss: Tensor, inputs: Inputs, targets: Any, rng_state: tuple | None) -> Tensor:
        if self._output_hooks is not None and not self._output_hooks.paused:
            self._output_hooks.detach()  # (the next tracked step attaches them again)
        model = self.model._orig_mod if self.compiled else self.model
        with sdpa_kernel(SDPBackend.MATH) if self.math_attention else nullcontext():
            again = loss_at(model, self.loss_function, inputs, targets, rng_state, weight=self.loss_weight) + self.regularization_tensor()
        value, expected = float(again.detach()), float(loss.detach())
        if not math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-6):
            how = " and ".join(
                part for part, used in (("without torch.compile", self.compiled), ("with attention on torch's math kernel", self.math_attention)) if used
            )
            raise ValueError(
                f"the loss computed again {how} (for graphs that can be differentiated twice) is {value:.6g}, "
                f"not the step's {expected:.6g}: its Hessian-vector products need the loss to be the loss module's "
                f"(times its factor, plus weight_decay's term), computed alike {how} and as trained"
            )
        return again

    def release_gradient_graph(self) -> None:
        """Detach the gradients ``p.grad`` from the graph that ``backward(create_graph=True)`` left
        on them (which also breaks the parameter-gradient reference cycle)."""
        for p in self.params:
            if p.grad is not None and p.grad.grad_fn is not None:
                p.grad = p.grad.detach()

    def start_slopes(self, inputs: Inputs, targets: Any, theta: list[Tensor], rng_state: tuple | None) -> Callable[[list[Tensor]], Tensor]:
        """Return ``d -> [N]``, each sample's directional derivative ``g_i . d`` at ``theta``, by one
        forward-mode pass on the same batch per call (:func:`functional_passes.per_sample_slopes`).

        Where the model has an operation without a forward-mode derivative (torch's
        ``scaled_dot_product_attention`` on the CPU, say) and the layers' hooks give every
        per-sample gradient, by a forward and a backward pass at ``theta`` instead, in which the
        hooks take the products (:meth:`_slopes_by_hooks`)."""
        named_theta, weight = dict(zip(self.names, theta)), self.loss_weight  # the step's: the calls come after its update
        forward = per_sample_slopes(self.model, named_theta, self._per_sample_loss(weight), self.weight_decay, self.sync, inputs, targets, rng_state)
        backward = self._slopes_by_hooks if self.factored else self._slopes_by_functorch

        def slopes(direction: list[Tensor]) -> Tensor:
            if self._forward_mode:
                try:
                    return forward(direction)
                except NotImplementedError:  # torch's words for an operation without forward-mode AD
                    self._forward_mode = False
            return backward(inputs, targets, theta, rng_state, direction, weight)

        return slopes

    def _slopes_by_functorch(self, inputs: Inputs, targets: Any, theta: list[Tensor], rng_state: tuple | None, direction: list[Tensor], weight: float) -> Tensor:
        """Return ``g_i . d`` at ``theta`` for every sample (float64 ``[N]``, the global batch's)
        from the per-sample gradients at ``theta`` that ``torch.func`` forms
        (:meth:`_functorch_per_sample`, of the losses times ``weight``), multiplied with ``d`` a
        parameter at a time."""
        gradients = self._functorch_per_sample(inputs, targets, rng_state, theta, weight)
        products = sum((samples.flatten(1) @ d.reshape(-1).to(samples.dtype)).double() for samples, d in zip(gradients, direction))
        return self.sync.gather(products + regularizer_slope(theta, direction, self.weight_decay))

    def _slopes_by_hooks(self, inputs: Inputs, targets: Any, theta: list[Tensor], rng_state: tuple | None, direction: list[Tensor], weight: float) -> Tensor:
        """Return ``g_i . d`` at ``theta`` for every sample (float64 ``[N]``, the global batch's)
        from one forward pass with ``theta`` as the parameters and one backward pass of the loss
        times ``weight``, in which each layer's hooks take its products with ``d``
        (:func:`output_hooks.layer_products`): no per-sample gradient is formed."""
        hooks, scale = self._output_hooks, self.gradient_scale
        accumulator, options = Accumulator(len(self.params)), ReductionOptions(direction=list(direction))
        named = {name: point.detach().requires_grad_(True) for name, point in zip(self.names, theta)}
        attached = hooks.attached
        hooks.attach()
        hooks.layer_callback = self._layer_projections(accumulator, options, theta)
        self.gradient_scale = 1.0
        try:
            loss = loss_at(self.model, self.loss_function, inputs, targets, rng_state, named, weight)
            torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        finally:
            hooks.layer_callback, self.gradient_scale = None, scale
            hooks.flush()  # (this pass's runs of the layers are no step's)
            if not attached:
                hooks.detach()
        if accumulator.failed:
            raise RuntimeError(accumulator.errors[0])
        skipped = [i for i in range(len(self.params)) if i not in accumulator.sourced and self.weight_decay[i]]
        if skipped:  # a layer the pass skipped: only the regulariser's part, the same for every sample
            shared = sum(self.weight_decay[i] * torch.dot(theta[i].reshape(-1), direction[i].reshape(-1)).double() for i in skipped)
            accumulator.add(PROJECTIONS, shared.expand(samples_in(inputs)))
        accumulator.synchronize(self.sync)
        return accumulator.totals[PROJECTIONS]


INPUT_ONLY = (nn.Linear, nn.Conv1d, nn.Conv2d)
UNSEEN_LOSS_TERM = (
    "the per-sample gradients of the per-sample loss function{times} (by torch.func) do not average to the step's gradient "
    "(they differ by {part:.2g} of its norm): the loss has a term that function does not compute, or the model mixes the "
    "samples of a batch; compute the loss as loss_function(outputs, targets), times a factor if need be, plus "
    "weight_decay's term and terms of the parameters alone"
)
UNFACTORED_WEIGHT = "the loss module's output enters the loss times {weight:g}, whose curvature has no square-root factor"
LOSS_NOT_FROM_MODULE = (
    "the loss was not computed by the loss module given to the instruments ({name}), where BackPACK's curvature "
    "rules start: compute it as loss = loss_function(outputs, targets) with that very module"
)


GRAPH_LOSS_MISMATCH = (
    "the loss backpropagated ({step:.6g} without weight_decay's term) is not {weight:g} times the loss module's value "
    "({name}, {graph:.6g} with the factor) on the outputs of BackPACK's graph of the model, whose curvature would be "
    "that: compute the loss as a factor times loss_function(outputs, targets), plus weight_decay's term"
)


LOSS_NOT_FROM_LAST_CALL = (
    "the loss module ({name}) was called again after computing the loss (for another output), and BackPACK's "
    "curvature rules start from its last call: compute other values with another instance of it"
)


def out_of_place(model: nn.Module) -> list[nn.Module]:
    """Switch the model's in-place modules (``ReLU(inplace=True)``, ...) to compute the same
    values out of place, and return them, to be set back after the pass: BackPACK's backward
    hooks hand a hooked layer's output on as a view that no in-place operation may change (torch
    raises in the forward pass)."""
    switched = [module for module in model.modules() if getattr(module, "inplace", None) is True]
    for module in switched:
        module.inplace = False
    return switched


def _mean_tolerance(dtype: torch.dtype, autocast: bool) -> float:
    """How far (relative to its norm) the mean of torch.func's per-sample gradients may lie from
    the training's gradient, formed in another order (under autocast, in another precision; with
    TF32 convolutions on a GPU, to about 1e-3)."""
    if autocast or torch.finfo(dtype).bits < 32:
        return 0.05
    return 1e-2 if dtype == torch.float32 else 1e-6


def _own_memory(samples: Tensor) -> Tensor:
    """Return ``samples`` (``[N, *p.shape]``), copied where its rows share memory: torch.func
    gives a parameter the loss does not read (a layer the forward pass skips) one zero gradient
    broadcast to every sample, which the regulariser's gradient cannot be added to in place."""
    shared = any(stride == 0 and size > 1 for stride, size in zip(samples.stride(), samples.shape))
    return samples.contiguous() if shared else samples


def _add_loss_term(samples: Tensor, gradient: Tensor) -> None:
    """Add to every per-sample gradient (``[N, *p.shape]``, in place) the part of the training's
    ``gradient`` that their mean lacks: the gradient of a term of the loss of its own (a penalty
    on the weights), the same for every sample. Where that part is within the rounding of the
    two ways of forming the gradient (a weight tied by a functional call, which torch.func
    follows), nothing is added: exact zeros stay zeros for the histograms."""
    gradient = gradient.detach()  # (differentiable where Hessian-vector products follow)
    remainder = gradient - samples.mean(0)
    if float(remainder.norm()) > torch.finfo(samples.dtype).eps ** 0.5 * float(gradient.norm()):
        samples += remainder


def _backward(loss: Tensor, retain_graph: bool, create_graph: bool) -> None:
    """``loss.backward`` (with ``create_graph``, without torch's warning about the reference cycle
    between parameters and their gradients: :meth:`GradientCapture.release_gradient_graph` breaks it)."""
    if not create_graph:
        loss.backward(retain_graph=retain_graph)
        return
    with quiet_notices():
        loss.backward(create_graph=True)


def run_extensions(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
    """BackPACK's ``hook_run_extensions``, not recorded by autograd (the backward pass may be
    building a graph of the gradients for Hessian-vector products)."""
    with torch.no_grad():
        hook_run_extensions(module, grad_input, grad_output)


def store_inputs(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    """BackPACK's ``hook_store_io`` for first-order rules of Linear and convolution layers.

    It stores the inputs (``module.input0``, ...) but, in place of the output, a stand-in of the
    output's shape, dtype and device that holds one element: these rules read only the output's
    shape, and keeping the output itself would hold every layer's pre-activation alive until the
    backward pass reaches it (plain training frees it once the activation function has run).
    """
    if torch.is_grad_enabled():
        for i, tensor in enumerate(inputs):
            setattr(module, f"input{i}", tensor)
        module.output = torch.empty((), dtype=output.dtype, device=output.device).expand(output.shape)
