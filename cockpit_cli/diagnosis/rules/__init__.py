"""The diagnosis rules, one per module, registered by name in :data:`RULES`."""

from __future__ import annotations

from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.rules.dead_units import DeadUnits
from cockpit_cli.diagnosis.rules.divergence import Divergence
from cockpit_cli.diagnosis.rules.early_stopping import EarlyStopping
from cockpit_cli.diagnosis.rules.exploding_gradients import ExplodingGradients
from cockpit_cli.diagnosis.rules.frozen_parameters import FrozenParameters
from cockpit_cli.diagnosis.rules.gradient_noise import GradientNoise
from cockpit_cli.diagnosis.rules.lr_too_large import LrTooLarge
from cockpit_cli.diagnosis.rules.lr_too_small import LrTooSmall
from cockpit_cli.diagnosis.rules.misscaled_inputs import MisscaledInputs
from cockpit_cli.diagnosis.rules.overfitting import Overfitting
from cockpit_cli.diagnosis.rules.stalled_training import StalledTraining
from cockpit_cli.diagnosis.rules.vanishing_gradients import VanishingGradients

RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` to :data:`RULES`.

    Raises:
        ValueError: a rule of the same name is already registered.
    """
    if rule.name in RULES:
        raise ValueError(f"diagnosis rule '{rule.name}' is registered twice")
    RULES[rule.name] = rule
    return rule


for _rule in (
    Divergence(),
    MisscaledInputs(),
    ExplodingGradients(),
    VanishingGradients(),
    DeadUnits(),
    FrozenParameters(),
    LrTooLarge(),
    LrTooSmall(),
    GradientNoise(),
    StalledTraining(),
    Overfitting(),
    EarlyStopping(),
):
    register(_rule)

__all__ = ["RULES", "Rule", "register"]
