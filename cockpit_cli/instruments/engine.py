"""The instruments engine: decides what is due, runs the one backward pass, collects values.

Use it in place of ``loss.backward()`` in any training loop::

    instruments = Instruments(model, loss_function, per_sample_loss_function, optimizer, quantities)
    for step, (inputs, targets) in enumerate(loader):
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_function(outputs, targets)
        instruments.backward(step, loss, inputs, outputs, targets)   # instead of loss.backward()
        optimizer.step()
        instruments.after_update(step)
        for done_step, values in instruments.completed(step).items(): ...
    instruments.finish()

The engine never looks at a quantity's type: it asks each active quantity for its
requirements, takes their union, and hands every quantity the same :class:`StepData`. A
quantity that fails is switched off with its reason; it never stops the training.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map
from torch.utils.hooks import RemovableHandle

from cockpit_cli.instruments import curvature_memory
from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.activation_recorder import ActivationRecorder
from cockpit_cli.instruments.backend import GradientCapture
from cockpit_cli.instruments.batch_inputs import Inputs, batch_device, batch_size, floating_columns
from cockpit_cli.instruments.curvature_graph import WHOLE_COLUMNS_MOST, WHOLE_TOO_MANY, takes_model_whole
from cockpit_cli.instruments.functional_passes import capture_rng_state, fused_attention_without_second_derivative, no_second_derivative
from cockpit_cli.instruments.loss_scale import LossScale, scale_factor, scaled_loss
from cockpit_cli.instruments.model_hooks import ModelHook
from cockpit_cli.instruments.per_sample_loss import one_per_sample, per_sample_means
from cockpit_cli.instruments.quantities import Quantity, StepData, UpdateData
from cockpit_cli.instruments.quantities import base as q
from cockpit_cli.instruments.quantities.alpha import START_SLOPES
from cockpit_cli.instruments.support import GRAPH_IN_PARALLEL, Support, check_support, mixing_batch_norm, mixing_reason
from cockpit_cli.instruments.sync import Synchronizer
from cockpit_cli.plain_sgd import PLAIN_SGD, unlike_plain_sgd

def is_plain_sgd(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Return whether ``optimizer`` steps ``d = -lr * g`` on every trainable parameter of
    ``model`` (SGD, no momentum / decay / Nesterov, one lr, no parameter left out)."""
    groups = optimizer.param_groups
    plain = all(unlike_plain_sgd("SGD", group) is None for group in groups)
    return type(optimizer) is torch.optim.SGD and plain and len({g["lr"] for g in groups}) == 1 and untrained_parameter(optimizer, model) is None


def untrained_parameter(optimizer: torch.optim.Optimizer, model: nn.Module) -> str | None:
    """Return the name of a parameter of ``model`` that requires gradients but is in none of
    ``optimizer``'s parameter groups (its update is zero, not ``-lr * g``), or ``None``."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return next((name for name, p in model.named_parameters() if p.requires_grad and id(p) not in trained), None)


def unavailable_reason(quantity: Quantity, support: Support, optimizer: torch.optim.Optimizer, model: nn.Module) -> str | None:
    """Why ``quantity`` cannot be tracked with this model, loss (``support``) and optimizer, or ``None``."""
    if quantity.per_sample and support.per_sample is None:
        return support.per_sample_reason
    if quantity.needs_curvature and not support.curvature:
        return support.curvature_reason
    if quantity.plain_sgd_only and not is_plain_sgd(optimizer, model):
        return f"defined for {PLAIN_SGD}; this run uses {_unlike_plain_sgd(optimizer, model)}"
    return None


def _unlike_plain_sgd(optimizer: torch.optim.Optimizer, model: nn.Module) -> str:
    """Say what makes ``optimizer`` other than plain SGD of ``model``: ``"Adam"``, ``"SGD with
    momentum 0.9"``, ``"SGD of some parameters ('0.weight' is in no parameter group)"``."""
    name, groups = type(optimizer).__name__, optimizer.param_groups
    unlike = unlike_plain_sgd(name, groups[0], len({g["lr"] for g in groups}))
    if unlike is None and (left_out := untrained_parameter(optimizer, model)) is not None:
        unlike = f"{name} of some parameters ('{left_out}' requires gradients but is in no parameter group)"
    return unlike or name


class Instruments:
    """Attach quantities to a model's training.

    Args:
        model: The network.
        loss_function: Mean-reduced loss ``(outputs, targets) -> scalar`` used for training.
        per_sample_loss_function: ``(outputs, targets) -> [N]`` per-sample data losses.
        optimizer: The optimizer (its type decides plain-SGD-only quantities and Alpha's path).
        quantities: The quantities, each with its schedule.
        weight_decay: L2 factor lambda of a regulariser ``0.5 * lambda * ||w||^2`` that the
            training loss includes, applied to ``decayed_parameters``.
        decayed_parameters: The parameters the regulariser applies to.
        curvature: Curvature diagonal for HessTrace / TIC: ``hessian``, ``ggn`` or ``ggn_mc``.
        sync: For data-parallel training: combines the processes' shards, so that every value
            is the global batch's (each process passes its shard of ``n = N / W`` samples and
            its local mean loss; the model's gradients must be averaged, as DDP does).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_function: Any,
        per_sample_loss_function: Any,
        optimizer: torch.optim.Optimizer,
        quantities: Iterable[Quantity],
        weight_decay: float = 0.0,
        decayed_parameters: Iterable[nn.Parameter] = (),
        curvature: str = "hessian",
        sync: Synchronizer | None = None,
    ):
        self.sync = sync or Synchronizer()
        self.model = model
        self.optimizer = optimizer
        per_sample_loss_function = per_sample_means(per_sample_loss_function)  # [N], whatever the loss's element axes
        self.per_sample_loss_function = per_sample_loss_function
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        decayed = {id(p) for p in decayed_parameters}
        self.plain_sgd = is_plain_sgd(optimizer, model)
        decay = [weight_decay if id(p) in decayed else 0.0 for p in self.params]
        support = check_support(model, loss_function, curvature)
        if support.curvature_by_graph and self.sync.world_size > 1:  # a pass of its own through the model's layers, outside the data-parallel wrapper
            support = replace(support, curvature=False, graph=None, curvature_reason=GRAPH_IN_PARALLEL.format(name=type(model).__name__))
        self._batch_norm = any(isinstance(module, _BatchNorm) for module in model.modules())  # its mode is checked at tracked steps
        self._all_params = list(model.parameters())  # (walking the modules again costs a small model's step 20 us)
        self._trainable = [p.requires_grad for p in self._all_params]  # as attached (see _check_trainability)
        self._trainability_changed = False  # said once
        self.capture = GradientCapture(model, loss_function, per_sample_loss_function, self.params, self.names, support, curvature, decay, self.sync)
        self.unavailable: dict[str, str] = {}
        # quantities the run's data leave without a meaning (no warning: nothing went wrong)
        self.inapplicable: set[str] = set()
        self.changes: list[str] = []  # how the instruments changed their way during the run, for the run's warnings
        self._repeated = False  # whether a step had a second backward pass
        self._overflow_noted = False  # whether a step's scaled gradients overflowed
        self.quantities = [quantity for quantity in quantities if self._available(quantity)]
        self.curvature, self.loss_function = curvature, loss_function
        self._output_sizes: curvature_memory.OutputSizes | None = None  # measures the first curvature step's layer outputs
        self._curvature_checked = self.support.curvature_by_products  # (no factor to fit in memory)
        for quantity in self.quantities:
            quantity.attach(self.params, self.plain_sgd)
        self.lag = max((quantity.lag for quantity in self.quantities), default=0)
        self.results: dict[int, dict[str, Any]] = {}  # by the engine's own count of steps
        self._labels: dict[int, int] = {}  # the loop's number of each counted step whose values are not handed out yet, where it differs
        self._awaiting_update: int | None = None  # the loop's number of the step whose backward pass ran, until its update
        self.started = time.perf_counter()
        self.next_step = 0
        self._planned: tuple[int, list[Quantity], list[set[str]], set[str]] | None = None
        self._idle_until: float = 0  # no quantity is active before this step (known at an idle step)
        self._quiet = False  # hooks and recording are off for idle steps
        self._before: list[Tensor] | None = None
        self._updating: list[Quantity] = []
        self._start_slopes = None
        self._gradients: list[tuple[Tensor, int] | None] | None = None  # the gradients a plain-SGD step should take (see _versions)
        self._rng_state: tuple | None = None
        self._own_pass = False  # True while the engine runs forward passes of its own
        self._forward_hook: RemovableHandle | None = model.register_forward_pre_hook(ModelHook(self._before_forward))
        self._activations: ActivationRecorder | None = None
        if any(q.ACTIVATIONS in quantity.requirements(0) for quantity in self.quantities):
            self._activations = ActivationRecorder(model, self.sync, ignore=lambda: self._own_pass)

    @property
    def support(self) -> Support:
        """What the model supports (the capture may learn more at a tracked step: a layer that runs twice)."""
        return self.capture.support

    # -- what is due -----------------------------------------------------------------------

    def _available(self, quantity: Quantity) -> bool:
        reason = unavailable_reason(quantity, self.support, self.optimizer, self.model)
        if reason:
            self.unavailable[quantity.name] = reason
        return reason is None

    def _plan(self, step: int) -> tuple[list[Quantity], set[str]]:
        """Return the quantities active at ``step`` and what they need (asked once per step:
        before the forward pass and again at the backward pass)."""
        if self._planned is not None and self._planned[0] == step:
            return self._planned[1], self._planned[3]
        if step < self._idle_until:  # nothing is due before then: skip asking every quantity
            self._planned = (step, [], [], set())
            return [], set()
        active = [quantity for quantity in self.quantities if quantity.is_active(step)]
        requirements = [quantity.requirements(step) for quantity in active]
        needs: set[str] = set().union(*requirements)
        self._planned = (step, active, requirements, needs)
        if not active:
            upcoming = [due for due in (quantity.next_active(step) for quantity in self.quantities) if due is not None]
            self._idle_until = min(upcoming, default=math.inf)
        return active, needs

    def _needing(self, need: str) -> list[Quantity]:
        """Return the quantities active at the planned step that need ``need`` (and are still on)."""
        return self._needing_any({need})

    def _needing_any(self, wanted: set[str] | frozenset[str]) -> list[Quantity]:
        """Return the quantities active at the planned step that need any of ``wanted`` (and are still on)."""
        _, active, requirements, _ = self._planned
        return [quantity for quantity, needs in zip(active, requirements) if needs & wanted and quantity in self.quantities]

    def _switch_off(self, quantities: list[Quantity], reason: str, inapplicable: bool = False) -> None:
        """Stop tracking ``quantities`` for the rest of the run, with ``reason`` in the manifest
        (``inapplicable``: the data leave them without a meaning, which is no failure)."""
        for quantity in quantities:
            self.quantities.remove(quantity)
            self.unavailable[quantity.name] = reason
            if inapplicable:
                self.inapplicable.add(quantity.name)
        self._idle_until = 0

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: prepare what the coming step's forward pass must record."""
        if self._own_pass or not torch.is_grad_enabled():  # (a model may train in eval mode, to keep its dropout off)
            return
        active, needs = self._plan(self.next_step)
        if not needs and self._quiet:  # an idle step after an idle step: everything is off already
            return
        self._quiet = not needs
        if needs:
            self.capture.loss_calls.watch()  # the factor of the loss module's output in the step's loss
            self.capture.autocast = _autocast_enabled()
        if self._batch_norm and any(quantity.per_sample for quantity in active):
            needs = self._check_batch_norm(needs)
        if needs and not self._trainability_changed:
            self._check_trainability()
        if q.CURVATURE in needs and self.support.curvature and _autocast_enabled():
            self._switch_off(self._needing(q.CURVATURE), AUTOCAST_REASON)
            self._planned = None
            _, needs = self._plan(self.next_step)
        if self._activations is not None and q.ACTIVATIONS in needs:
            self._activations.start()
        elif self._activations is not None:
            self._activations.remove()
        if q.CURVATURE in needs and self.support.curvature and not self._curvature_checked and self._output_sizes is None:
            self._output_sizes = curvature_memory.OutputSizes(self.model, ignore=lambda: self._own_pass, residual=self.capture.adds_curvature_residual)
        per_sample_by_functorch = bool(needs & r.NEEDS_SAMPLES) and self.capture.may_use_torch_func(curvature=q.CURVATURE in needs)
        # (at every step with Hessian-vector products: they may have to compute the loss again, see _compute)
        replay = START_SLOPES in needs or self._by_forward_mode(needs) or per_sample_by_functorch or q.HVP in needs
        self._rng_state = capture_rng_state(self.params[0].device) if replay and self.params else None
        if self._uses_backpack(needs):
            self.capture.attach(curvature=self._curvature_by_backpack(needs))
        else:
            self.capture.release()
            if needs & r.NEEDS_SAMPLES:
                self.capture.count_runs()

    def _check_trainability(self) -> None:
        """Say once where parameters were frozen or unfrozen after the instruments were attached:
        they follow the parameters that required gradients then."""
        if [p.requires_grad for p in self._all_params] == self._trainable:  # one pass, at the steps with anything due
            return
        tracked = {id(p) for p in self.params}
        unfrozen = [name for name, p in self.model.named_parameters() if p.requires_grad and id(p) not in tracked]
        frozen = [name for name, p in self.model.named_parameters() if not p.requires_grad and id(p) in tracked]
        self._trainability_changed = True
        parts = []
        if unfrozen:
            parts.append(f"parameters {_names(unfrozen)} train but did not when the instruments were attached, which leave them out")
        if frozen:
            parts.append(f"parameters {_names(frozen)} no longer train, which the instruments count with zero gradients")
        self.changes.append(f"from step {self.next_step}: {'; '.join(parts)} (attach the instruments after changing which parameters train)")

    def _check_batch_norm(self, needs: set[str]) -> set[str]:
        """Before a forward pass with per-sample quantities due: where a batch-norm layer now
        mixes the samples (switched to training mode after the instruments were attached), switch
        those quantities off with the reason; return what the step then needs."""
        mixing = mixing_batch_norm(self.model)
        if mixing is None:
            return needs
        self._switch_off([quantity for quantity in self.quantities if quantity.per_sample], f"from step {self.next_step}: {mixing_reason(*mixing)}")
        self._planned = None
        return self._plan(self.next_step)[1]

    def _watch_forward(self, next_step: int) -> None:
        """Keep the forward pre-hook only where it has work: an idle stretch whose recording is
        off already (``_quiet``) runs without it until the step before the next due one (even a
        hook that returns at once costs a small model's step several microseconds)."""
        wanted = not self._quiet or next_step >= self._idle_until
        if wanted and self._forward_hook is None:
            self._forward_hook = self.model.register_forward_pre_hook(ModelHook(self._before_forward))
        elif not wanted and self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def _uses_backpack(self, needs: set[str]) -> bool:
        """Whether the step's backward pass runs BackPACK extensions (so its hooks must be in place)."""
        per_sample = bool(needs & r.NEEDS_SAMPLES) and not self._by_forward_mode(needs) and self.support.per_sample == "backpack"
        return per_sample or self._curvature_by_backpack(needs)

    def _curvature_by_backpack(self, needs: set[str]) -> bool:
        """Whether the step's backward pass backpropagates BackPACK's curvature factors (not where
        a small model's Hessian diagonal comes from products, which need no hooks)."""
        return q.CURVATURE in needs and self.support.curvature and not self.support.curvature_by_products

    def _by_forward_mode(self, needs: set[str]) -> bool:
        """Whether projections g_i . u, the only per-sample values due, come from one forward-mode
        pass: cheaper than forming per-sample gradients, but not than products from the factors
        of Linear and convolution layers in the backward pass (see ``GradientCapture.factored``)."""
        return _projections_only(needs) and not self.capture.factored

    def _stop_recording(self) -> None:
        if self._activations is not None:
            self._activations.stop()

    @contextmanager
    def _engine_pass(self) -> Iterator[None]:
        """Mark forward passes the engine makes itself (torch.func, forward mode): hooks ignore them."""
        self._own_pass = True
        try:
            yield
        finally:
            self._own_pass = False

    # -- one step --------------------------------------------------------------------------

    def backward(self, step: int, loss: Tensor, inputs: Inputs, outputs: Any, targets: Any, scale: LossScale = 1.0) -> None:
        """Run the backward pass of ``step`` with whatever the due quantities need, and compute them.

        ``scale`` multiplies the gradient the pass adds to the parameters' (``1 / k`` for
        gradients accumulated over ``k`` micro-batches, or a gradient scaler: :mod:`loss_scale`),
        as ``(scale * loss).backward()`` would; the quantities describe ``loss`` itself.

        ``inputs`` is the model's input batch, or the tuple of its positional inputs
        (:mod:`batch_inputs`); ``targets`` what the loss functions take beside the outputs. A
        step's later backward passes (gradients accumulated over micro-batches) are plain ones:
        the step's values describe its first backward pass's batch.

        The engine counts the steps itself, one by one: schedules and Alpha's next point follow
        its count, and the loop's ``step`` numbers the values it hands out. A loop may number
        its steps otherwise (from 0 in every epoch; a batch it skips leaves a gap)."""
        if step == self._awaiting_update:
            self._repeated_backward(step, loss, scale)
            return
        label, step = step, self._count_step(step)
        self._awaiting_update = label
        active, needs = self._plan(step)
        if q.CURVATURE in needs and not self._curvature_checked:
            active, needs = self._check_curvature_memory(step, inputs, outputs)
        if not active:
            self.capture.loss_calls.stop()
            scaled_loss(loss, scale).backward()
            self.capture.detach()
            self._watch_forward(step + 1)
            return
        options = r.ReductionOptions()
        for quantity in active:
            quantity.reduction_options(step, options)
        scale = scale_factor(loss, scale)
        weight = self.capture.find_loss_weight(loss)
        requested = frozenset(needs & r.KERNELS.keys())
        by_forward_mode = self._by_forward_mode(needs)
        if by_forward_mode:
            requested -= {r.PROJECTIONS}
        earlier = self._set_gradients_aside() if scale != 1.0 else None
        # The pass backpropagates the scaled loss, as training would (a gradient scaler's keeps
        # float16 output gradients from underflowing), and the capture divides what it reads.
        # BackPACK's curvature rules read the output gradients themselves: a pass with them
        # backpropagates the loss and scales the gradients afterwards.
        pass_scale = 1.0 if q.CURVATURE in needs and self.support.curvature else scale
        individual = None
        if q.INDIVIDUAL_LOSSES in needs:
            try:
                with torch.no_grad():
                    individual = weight * one_per_sample(self.per_sample_loss_function(_detach(outputs), targets).detach(), batch_size(inputs))
            except Exception as error:  # noqa: BLE001 - the user's function: the quantities reading it go off
                self._switch_off(self._needing(q.INDIVIDUAL_LOSSES), failure_reason(label, f"{type(error).__name__}: {error}"))
                active = [quantity for quantity in active if quantity in self.quantities]
            else:
                if any(self.capture.weight_decay):
                    individual = individual + self.capture.regularization()
                individual = self.sync.gather(individual)
        hvp = q.HVP in needs
        support, by_jacobian, math_attention = self.support, self.capture.per_sample_by_jacobian, self.capture.math_attention
        with self._engine_pass():
            accumulator = self.capture.backward(
                loss,
                inputs,
                targets,
                requested,
                per_sample=bool(requested & r.NEEDS_SAMPLES),
                curvature=q.CURVATURE in needs,
                options=options,
                retain_graph=hvp,
                rng_state=self._rng_state,
                # data-parallel gradients are taken again locally, a compiled model's from its uncompiled module
                create_graph=hvp and self.sync.world_size == 1 and not self.capture.products_by_replay,
                scale=pass_scale,
            )
        self.capture.detach()
        if self.capture.math_attention and not math_attention:  # the products of a small model's Hessian diagonal switched at this pass
            self.changes.append(f"from step {label}: {MATH_ATTENTION_NOTE}")
        if self.support.per_sample != support.per_sample:
            self.changes.append(f"from step {label}: {self.support.per_sample_reason}")
        if self.capture.per_sample_by_jacobian and not by_jacobian:
            self.changes.append(f"from step {label}: {JACOBIAN_REASON}")
        if pass_scale > 1.0 and not _finite_gradients(self.params):
            self._overflowed(label, step, active, pass_scale)
            if hvp:
                self.capture.release_gradient_graph()
            self._scale_gradients(1.0, earlier)
            self._stop_recording()
            return
        if by_forward_mode:
            theta = [p.detach() for p in self.params]
            with self._engine_pass():
                accumulator.add(r.PROJECTIONS, self.capture.start_slopes(inputs, targets, theta, self._rng_state)(options.direction))
        if accumulator.failed:  # the other parameters' parts are there, but a sum without one part is wrong
            self._switch_off(self._needing_any(accumulator.failed), failure_reason(label, accumulator.errors[0]))
            active = [quantity for quantity in active if quantity in self.quantities]
        if accumulator.dropped:  # not this step's values, where the usual way gives them at other steps
            skipping = self._needing_any(accumulator.dropped)
            for quantity in skipping:
                quantity.forget(step)
            active = [quantity for quantity in active if quantity not in skipping]
            self.changes.append(f"at step {label}: {', '.join(quantity.name for quantity in skipping)} left out: {accumulator.drop_reason}")
        measured = self._gathered_inputs(inputs) if q.INPUTS in needs else None
        if q.INPUTS in needs and measured is None:
            self._switch_off(self._needing(q.INPUTS), NO_MEASURED_INPUTS, inapplicable=True)
            active = [quantity for quantity in active if quantity in self.quantities]
        products = None
        if hvp:
            try:
                with self._engine_pass():
                    products = self.capture.hessian_vector_product(loss, inputs, targets, self._rng_state)
            except Exception as error:  # noqa: BLE001 - an instrument never stops training
                self._switch_off(self._needing(q.HVP), failure_reason(label, f"{type(error).__name__}: {error}"))
                active = [quantity for quantity in active if quantity in self.quantities]
        data = StepData(
            step=step,
            loss=self.sync.mean(float(loss.detach())),
            batch_size=batch_size(inputs) * self.sync.world_size,
            params=self.params,
            names=self.names,
            grads=self._pass_gradients(pass_scale),
            reductions=accumulator,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            plain_sgd=self.plain_sgd,
            elapsed=time.perf_counter() - self.started,
            individual_losses=individual,
            hvp=products,
            inputs=measured,
            activations=self._activations.statistics() if self._activations is not None else None,
        )
        try:
            with torch.no_grad():
                self._compute(active, data, lambda: self._products_on_math_attention(loss, inputs, targets))
        finally:
            if hvp:
                self.capture.release_gradient_graph()
        self._collect(data.outputs)
        del data, accumulator, options  # they may hold the direction of the last step's update
        if scale != 1.0:
            self._scale_gradients(scale / pass_scale, earlier)
        if q.PARAMS_BEFORE in needs:  # copied last, so that the last step's direction is released first
            self._before = [p.detach().clone() for p in self.params]
            self._updating = self._needing(q.PARAMS_BEFORE)
            if START_SLOPES in needs:
                self._start_slopes = self.capture.start_slopes(inputs, targets, self._before, self._rng_state)
                # d = -lr g where plain SGD steps with this pass's gradients as they are (not scaled)
                self._gradients = _versions(self.params) if self.plain_sgd and scale == 1.0 else None
        self._stop_recording()

    def _overflowed(self, label: int, step: int, active: list[Quantity], scale: float) -> None:
        """Give up ``step``, whose gradients of the loss times ``scale`` overflow: a gradient
        scaler skips its update and lowers the scale; the values would be those of the overflow."""
        for quantity in active:
            quantity.forget(step)
        if not self._overflow_noted:
            self._overflow_noted = True
            self.changes.append(
                f"from step {label}: steps whose gradients overflow at their loss scale (inf or NaN at scale {scale:g}; a "
                "gradient scaler skips their updates and lowers the scale) record no quantities"
            )

    def _set_gradients_aside(self) -> list[Tensor | None]:
        """Take the gradients the parameters hold before a scaled pass (they are usually ``None``),
        so that the pass forms its own from nothing."""
        earlier = [p.grad for p in self.params]
        for param in self.params:
            param.grad = None
        return earlier

    def _pass_gradients(self, scale: float) -> list[Tensor]:
        """The gradients of the pass's loss, from those of ``scale`` times it (copies where the
        scale is not 1), zeros for a parameter without one."""
        with torch.no_grad():
            return [torch.zeros_like(p) if p.grad is None else p.grad if scale == 1.0 else p.grad / scale for p in self.params]

    def _scale_gradients(self, scale: float, earlier: list[Tensor | None]) -> None:
        """After a scaled pass: ``p.grad = earlier + scale * (the pass's gradient)``."""
        with torch.no_grad():
            for param, before in zip(self.params, earlier):
                if param.grad is not None:
                    if scale != 1.0:
                        param.grad.mul_(scale)
                    if before is not None:
                        param.grad.add_(before)
                else:
                    param.grad = before

    def _gathered_inputs(self, inputs: Inputs) -> Tensor | None:
        """Return the floating-point inputs of the global batch, ``[N, M]``, or ``None`` where there are none."""
        columns = floating_columns(inputs)
        return None if columns is None else self.sync.gather(columns)

    def _repeated_backward(self, step: int, loss: Tensor, scale: LossScale) -> None:
        """Run another backward pass of ``step`` plainly. Its forward pass was prepared for the
        next step before this step's update, which Alpha's plan reads: the plan, hooks and counts
        it set up are dropped, and that step's own forward pass sets them again."""
        self.capture.release()
        self._planned, self._idle_until, self._quiet = None, 0, False
        scaled_loss(loss, scale).backward()
        if not self._repeated:
            self._repeated = True
            advice = "" if scale != 1.0 else (
                " (give each micro-batch's own loss, with scale=1/k where the gradients are to be the mean of k "
                "micro-batches: a loss divided by k divides the values)"
            )
            self.changes.append(
                f"from step {step}: a step's backward passes after its first (gradients accumulated over micro-batches) "
                f"are not tracked; each step's values describe the batch of its first backward pass{advice}"
            )

    def _check_curvature_memory(self, step: int, inputs: Inputs, outputs: Any) -> tuple[list[Quantity], set[str]]:
        """At the first step with curvature due: switch the curvature quantities off, with the
        reason, where the factor BackPACK would backpropagate exceeds the memory available
        (:mod:`curvature_memory`; in every process if in any), or where the GGN through the whole
        model would take more than :data:`WHOLE_COLUMNS_MOST` backward passes per sample; return
        the step's plan (changed if they were)."""
        self._curvature_checked = True
        sizes, self._output_sizes = self._output_sizes, None
        reason = None
        if sizes is not None:
            sizes.remove()
            if isinstance(outputs, Tensor) and sizes.largest > 0:
                reason = curvature_memory.shortfall(
                    curvature_memory.factor_columns(self.curvature, self.loss_function, outputs),
                    batch_size(inputs),
                    sizes.largest,
                    outputs.element_size(),
                    curvature_memory.available_bytes(outputs.device),
                    self.curvature,
                    sizes.residual_columns,
                )
        if reason is None and self.support.graph is not None and takes_model_whole(self.support.graph) and isinstance(outputs, Tensor):
            columns = curvature_memory.factor_columns(self.curvature, self.loss_function, outputs)
            if columns > WHOLE_COLUMNS_MOST:  # (each a backward pass per sample: hours a step for a thousand classes)
                reason = WHOLE_TOO_MANY.format(name=type(self.model).__name__, columns=columns, most=WHOLE_COLUMNS_MOST)
        if self.sync.world_size > 1:  # the processes must reduce the same statistics
            short = torch.tensor([float(reason is not None)], dtype=torch.float64, device=batch_device(inputs))
            if float(self.sync.maximum(short)) > 0 and reason is None:
                reason = "the curvature factor does not fit in the memory of another process (its run's warnings say by how much)"
        if reason is None:
            return self._plan(step)
        self._switch_off([quantity for quantity in self.quantities if quantity.needs_curvature], reason)
        self._planned = None
        return self._plan(step)

    def _count_step(self, label: int) -> int:
        """Count a step the loop numbers ``label``; return the engine's number for it."""
        step, self.next_step = self.next_step, self.next_step + 1
        if label != step:  # kept only where they differ (never in a loop that counts from 0 one by one)
            self._labels[step] = label
        return step

    def _label(self, step: int) -> int:
        """The loop's number of the counted ``step``."""
        return self._labels.get(step, step)

    def skip(self, step: int) -> None:
        """Call instead of :meth:`backward` for a step whose update is dropped (non-finite loss)."""
        self._count_step(step)
        self._awaiting_update = None
        self.capture.detach()
        self.capture.loss_calls.stop()
        self._stop_recording()
        self._watch_forward(self.next_step)

    def after_update(self, step: int) -> None:
        """Call after ``optimizer.step()`` of ``step``: quantities that compare theta_t and theta_{t+1}."""
        self._awaiting_update = None
        if self._before is None:
            return
        slopes = self._start_slopes
        if self._gradients is not None and _untouched(self._gradients, self.params):
            slopes = None  # plain SGD stepped with the backward pass's gradients untouched: d = -lr g
        data = UpdateData(step=self.next_step - 1, before=self._before, after=self.params, start_slopes=slopes)
        with self._engine_pass(), torch.no_grad():
            for quantity in self._updating:
                self._run(quantity, quantity.after_update, data)
        self._collect(data.outputs)
        self._before, self._updating, self._start_slopes, self._gradients = None, [], None, None

    def _run(self, quantity: Quantity, method: Any, data: Any) -> None:
        """Call ``method(data)`` (callers hold ``torch.no_grad``); a failure switches the quantity off."""
        error = _attempt(method, data)
        if error is not None:
            self._switch_off([quantity], failure_reason(self._label(data.step), error))

    def _compute(self, active: list[Quantity], data: StepData, math_attention: Callable[[], Callable[[list[Tensor]], list[Tensor]]]) -> None:
        """Compute the step's values. Where Hessian-vector products meet attention's fused kernels,
        which have no second derivative, they are taken again on the loss computed with the math
        kernel (``math_attention`` returns them), and the quantity computes once more."""
        for quantity in active:
            error = _attempt(quantity.compute, data)
            if error is not None and data.hvp is not None and fused_attention_without_second_derivative(error) and not self.capture.math_attention:
                try:
                    data.hvp = math_attention()
                except Exception as failure:  # noqa: BLE001 - an instrument never stops training
                    error = f"{type(failure).__name__}: {failure}"
                else:
                    error = _attempt(quantity.compute, data)
                    if error is None:
                        self.changes.append(f"from step {self._label(data.step)}: {MATH_ATTENTION_NOTE}")
            if error is not None:
                self._switch_off([quantity], failure_reason(self._label(data.step), error))

    def _products_on_math_attention(self, loss: Tensor, inputs: Inputs, targets: Any) -> Callable[[list[Tensor]], list[Tensor]]:
        """Switch the Hessian-vector products to attention on torch's math kernel from this step on
        (:meth:`GradientCapture.products_on_math_attention`) and return this step's."""
        self.capture.products_on_math_attention()
        with torch.enable_grad(), self._engine_pass():
            return self.capture.hessian_vector_product(loss, inputs, targets, self._rng_state)

    def _collect(self, outputs: dict[int, dict[str, Any]]) -> None:
        for step, values in outputs.items():
            self.results.setdefault(step, {}).update(values)

    # -- results ---------------------------------------------------------------------------

    def completed(self, step: int) -> dict[int, dict[str, Any]]:
        """Pop the values of every step up to ``lag`` steps before ``step``, the last one taken
        (complete once it is done), by the loop's numbers of the steps."""
        last = self.next_step - 1
        done = {self._label(s): self.results.pop(s) for s in sorted([s for s in self.results if s <= last - self.lag])} if self.results else {}
        if self._labels:
            for counted in [s for s in self._labels if s <= last - self.lag]:
                del self._labels[counted]
        return done

    def finish(self) -> dict[int, dict[str, Any]]:
        """Pop everything left (the last step's lagging values stay missing) and remove hooks."""
        self.capture.release()
        self.capture.loss_calls.stop()
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        if self._output_sizes is not None:
            self._output_sizes.remove()
            self._output_sizes = None
        if self._activations is not None:
            self._activations.remove()
        done = {self._label(s): self.results.pop(s) for s in sorted(self.results)}
        self._labels = {}
        return done

    def state_dict(self) -> dict[str, Any]:
        """Return the carried state: values waiting for their step, and each quantity's state."""
        return {"results": self.results, "next_step": self.next_step, "labels": self._labels, "quantities": {q.name: q.state_dict() for q in self.quantities}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the same quantities must be tracked)."""
        self.results = {int(step): values for step, values in state["results"].items()}
        self.next_step = int(state["next_step"])
        self._labels = {int(step): label for step, label in state.get("labels", {}).items()}
        self._awaiting_update = None
        self._idle_until, self._planned, self._quiet = 0, None, False
        self._watch_forward(self.next_step)
        for quantity in self.quantities:
            quantity.load_state_dict(state["quantities"].get(quantity.name, {}))

    def _graph_note(self) -> str | None:
        """:data:`GRAPH_NOTE` where a pass through BackPACK's graph gives the curvature (not for
        the whole model, whose note says so itself)."""
        graph = self.support.graph
        return GRAPH_NOTE if self.support.curvature_by_graph and not takes_model_whole(graph) else None

    def _lookup_tables(self) -> list[str]:
        """The tracked embedding tables: a batch's gradient of one is zero but in the rows of its
        ids, by construction (no sign of dead units)."""
        tables = {id(m.weight) for m in self.model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        return [name for name, p in zip(self.names, self.params) if id(p) in tables]

    def describe(self) -> dict[str, Any]:
        """Return what is tracked and what is not (for the run manifest)."""
        return {
            "parameters": self.names,
            "shapes": [list(p.shape) for p in self.params],
            "lookup_tables": self._lookup_tables(),
            "per_sample": self.support.per_sample,
            "curvature": self.curvature,
            "quantities": {quantity.name: quantity.schedule.describe() for quantity in self.quantities},
            "unavailable": dict(self.unavailable),
            "notes": [note for note in (self.support.per_sample_reason, self.support.curvature_reason, self._graph_note()) if note],
        }


def _attempt(method: Callable[[Any], None], data: Any) -> str | None:
    """Call ``method(data)``; return its failure as ``"Type: message"``, or ``None``."""
    try:
        method(data)
    except Exception as error:  # noqa: BLE001 - an instrument never stops training
        return f"{type(error).__name__}: {error}"
    return None


def failure_reason(step: int, error: str) -> str:
    """Return the manifest's reason for a quantity that failed at ``step`` with ``error``."""
    reason = f"failed at step {step} and was switched off: {error}"
    if no_second_derivative(error):
        reason += " (Hessian-vector products need the second derivative of every operation of the model; this one has none)"
    if "support saved tensor hooks" in error:  # torch.func's words for a model that checkpoints activations
        reason += " (torch.func, which forms the per-sample gradients of this model, cannot run through activation checkpointing)"
    return reason


MATH_ATTENTION_NOTE = (
    "attention's fused kernels have no second derivative: at the steps with Hessian-vector products (HessMaxEV, or "
    "the Hessian diagonal of a small model) the loss is computed again with attention on torch's math kernel, one more "
    "forward and backward pass"
)
NO_MEASURED_INPUTS = "the model's inputs hold no floating-point tensor (token ids, say): there are no measurements to describe"
AUTOCAST_REASON = "the forward pass runs under autocast (mixed precision), which BackPACK's curvature rules cannot backpropagate"
JACOBIAN_REASON = (
    "torch.func cannot run the model a sample at a time (vmap), so the per-sample gradients come from the Jacobian "
    "of the batch's losses: exact, one backward pass per sample"
)
GRAPH_NOTE = (
    "the curvature diagonal comes from a pass through BackPACK's graph of the model (its converter's): one more "
    "forward and backward pass at each step with HessTrace or TIC due"
)


def _autocast_enabled() -> bool:
    """Whether the current forward pass runs under ``torch.autocast`` (on the CPU or a GPU)."""
    try:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    except TypeError:  # torch before 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _projections_only(needs: set[str]) -> bool:
    """Whether projections g_i . u are the only per-sample values due (Alpha's second point)."""
    return needs & r.NEEDS_SAMPLES == {r.PROJECTIONS}


def _names(names: list[str]) -> str:
    """``'a', 'b', 'c' and 4 more``."""
    shown = ", ".join(f"'{name}'" for name in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _finite_gradients(params: list[Tensor]) -> bool:
    """Whether every element of the parameters' gradients is finite (one transfer from a GPU)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _versions(params: list[Tensor]) -> list[tuple[Tensor, int] | None]:
    """Each parameter's gradient and its version, which stays as it is until the gradient is
    changed in place (clipped, accumulated, unscaled)."""
    return [None if p.grad is None else (p.grad, p.grad._version) for p in params]


def _untouched(kept: list[tuple[Tensor, int] | None], params: list[Tensor]) -> bool:
    """Whether every gradient of ``params`` is the very tensor ``kept`` by :func:`_versions`, unchanged."""
    return all((p.grad is None) if k is None else (p.grad is k[0] and p.grad._version == k[1]) for k, p in zip(kept, params))


def _detach(outputs: Any) -> Any:
    """Detach the tensors of the model's outputs: a tensor, or tuples, lists and dicts of them."""
    if isinstance(outputs, Tensor):  # the usual case, without the tree's walk (some microseconds)
        return outputs.detach()
    return tree_map(lambda value: value.detach() if isinstance(value, Tensor) else value, outputs)
