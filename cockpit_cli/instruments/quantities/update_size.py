"""UpdateSize: ||theta_{t+1} - theta_t|| per parameter, stored at step t."""

from __future__ import annotations

from cockpit_cli.instruments.quantities.base import PARAMS_BEFORE, Quantity, UpdateData, register


@register
class UpdateSize(Quantity):
    name = "UpdateSize"

    def requirements(self, step: int) -> set[str]:
        return {PARAMS_BEFORE}

    def after_update(self, data: UpdateData) -> None:
        data.emit(self.name, data.update_norms)
