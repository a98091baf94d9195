"""The rules a BackPACK extension holds, by layer class."""

from __future__ import annotations

from backpack.extensions.backprop_extension import BackpropExtension


def module_rules(extension: BackpropExtension) -> dict[type, object]:
    """The rule of each layer class a BackPACK extension has one for (its own registry, which
    ``set_module_extension`` fills)."""
    return getattr(extension, "_BackpropExtension__module_extensions", {})
