"""Instruments: Cockpit's quantities computed through BackPACK in one fused backward pass."""

import warnings

# BackPACK scripts a helper with torch.jit at import, which recent torch calls deprecated; the
# warning says nothing a user of cockpit can act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

from cockpit_cli.instruments.engine import Instruments  # noqa: E402
from cockpit_cli.instruments.presets import PRESETS  # noqa: E402
from cockpit_cli.instruments.quantities import QUANTITIES, Quantity  # noqa: E402
from cockpit_cli.instruments.schedules import Schedule  # noqa: E402

__all__ = ["Instruments", "PRESETS", "QUANTITIES", "Quantity", "Schedule"]
