"""A user's own data-parallel loop with ``TrackedRun``: run directly for one process, or under
``python -m torch.distributed.run --nproc-per-node W``, where every process trains on its shard
of each batch through ``DistributedDataParallel`` and the instruments combine the shards.

Usage: ``distributed_api_worker.py RUN_DIR [SCALE]``. Process 0 writes the run directory. With
``SCALE``, every backward pass is of the loss times it (as a gradient scaler's), and the gradients
are divided by it before the update; the curvature diagonals, whose passes backpropagate the loss
itself, are left out.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import reference as ref
from cockpit_cli.api import TrackedRun

warnings.filterwarnings("ignore")

N, STEPS = 8, 3
OTHERS = {"CABS": True, "EarlyStopping": True}
UNSCALED = {"HessTrace": False, "TICDiag": False}  # left out of a scaled run


def main(run_dir: str, scale: float = 1.0) -> None:
    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = ref.mlp(0)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    batches = [ref.batch("mlp", "ce", N, 100 + step) for step in range(STEPS)]
    with TrackedRun(run_dir, model, loss_fn, nn.CrossEntropyLoss(reduction="none"), optimizer, preset="full", quantities=dict(OTHERS, **(UNSCALED if scale != 1.0 else {}))) as run:
        for step, batch in enumerate(batches):
            shard = slice(rank * N // world, (rank + 1) * N // world)
            inputs, targets = batch.inputs[shard], batch.targets[shard]
            optimizer.zero_grad()
            outputs = trained(inputs)
            loss = loss_fn(outputs, targets)
            run.backward(step, loss, inputs, outputs, targets, scale=scale)
            for param in model.parameters():
                param.grad /= scale
            optimizer.step()
            run.step(step, loss)
        run.evaluate(STEPS, valid=(0.5, 0.75))
    if distributed:  # the DistributedDataParallel wrapper holds the group: collected first
        del trained, run
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:]))
