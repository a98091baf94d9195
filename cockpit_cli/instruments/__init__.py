"""Instruments: Cockpit's quantities computed through BackPACK in one fused backward pass."""

from cockpit_cli.instruments.torch_notices import quiet_notices

with quiet_notices():  # BackPACK scripts a helper with torch.jit at its import
    from cockpit_cli.instruments.engine import Instruments
    from cockpit_cli.instruments.presets import PRESETS
    from cockpit_cli.instruments.quantities import QUANTITIES, Quantity
    from cockpit_cli.instruments.schedules import Schedule

__all__ = ["Instruments", "PRESETS", "QUANTITIES", "Quantity", "Schedule"]
