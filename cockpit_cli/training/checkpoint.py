"""Checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint holds the model, optimizer and scheduler states, the random states, where the
data order stands (the epoch's sampler state and the batches already taken), and the
instruments' carried state (the Distance origin, Alpha's pending step, the records waiting for
their lagging values). It is written atomically (a temporary file, then a rename) and read with
``weights_only=True``: nothing but tensors and plain containers is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cockpit_cli.errors import CockpitError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``run_dir/checkpoint.pt`` atomically."""
    path = run_dir / CHECKPOINT
    temporary = path.with_name(f".{CHECKPOINT}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise CockpitError(f"cannot write the checkpoint {path}: {error.strerror}", "free disk space; the run's records so far are intact") from None


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pt`` (tensors and plain containers only).

    Raises:
        CockpitError: no checkpoint, or one that cannot be read.
    """
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise CockpitError(f"{run_dir} has no checkpoint to resume from", "set training.checkpoint_every in the config of runs you may want to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise CockpitError(f"the checkpoint {path} cannot be read ({type(error).__name__})", "it is damaged; the run cannot be resumed from it") from None


def rng_state(device: torch.device) -> dict[str, Any]:
    """Return the torch random states (CPU, and the device's on CUDA)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
