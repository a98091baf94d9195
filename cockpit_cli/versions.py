"""Versions of the packages a run depends on, for the manifest (no imports of the packages)."""

from __future__ import annotations

import platform
from importlib import metadata

from cockpit_cli import __version__

_PACKAGES = ("torch", "torchvision", "backpack-for-pytorch", "numpy")


def package_versions() -> dict[str, str]:
    """Return ``{package: version}`` for cockpit, Python and the numeric packages installed."""
    versions = {"cockpit": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
