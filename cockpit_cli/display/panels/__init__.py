"""Dashboard panels: each a pure function from a :class:`DashboardState` to a Rich renderable."""

from cockpit_cli.display.panels.alerts import alerts
from cockpit_cli.display.panels.alpha import alpha
from cockpit_cli.display.panels.compact import compact
from cockpit_cli.display.panels.curvature import hess_max_ev, hess_trace, tic
from cockpit_cli.display.panels.distance import distance
from cockpit_cli.display.panels.grad_hist import grad_hist
from cockpit_cli.display.panels.grad_norm import grad_norm
from cockpit_cli.display.panels.grad_tests import grad_tests
from cockpit_cli.display.panels.header import header
from cockpit_cli.display.panels.hyperparameters import hyperparameters
from cockpit_cli.display.panels.layers import layers
from cockpit_cli.display.panels.performance import performance
from cockpit_cli.display.panels.summary import summary

__all__ = [
    "alerts",
    "alpha",
    "compact",
    "distance",
    "grad_hist",
    "grad_norm",
    "grad_tests",
    "header",
    "hess_max_ev",
    "hess_trace",
    "hyperparameters",
    "layers",
    "performance",
    "summary",
    "tic",
]
