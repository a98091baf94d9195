"""Every quantity, one per module; importing this package fills :data:`QUANTITIES`."""

from cockpit_cli.instruments.quantities import (  # noqa: F401  (imported to register)
    activations,
    alpha,
    cabs,
    distance,
    early_stopping,
    grad_hist_1d,
    grad_hist_2d,
    grad_norm,
    hess_max_ev,
    hess_trace,
    inner_test,
    input_stats,
    layer_stats,
    loss,
    mean_gsnr,
    norm_test,
    ortho_test,
    tic_diag,
    tic_trace,
    time,
    update_size,
)
from cockpit_cli.instruments.quantities.base import QUANTITIES, Quantity, StepData, UpdateData

__all__ = ["QUANTITIES", "Quantity", "StepData", "UpdateData"]
