"""Train a tiny reference model with every quantity tracked, alone or as one of several processes.

Run directly for one process, or under ``python -m torch.distributed.run --nproc-per-node W``:
then every process trains on its shard of each batch through DistributedDataParallel, and the
instruments combine the shards. Rank 0 writes ``{step: {quantity: value}}`` as JSON to OUT, so a
test can compare the two.

Usage: ``distributed_worker.py OUT KIND OPTIMIZER [FAIL_AT]`` with KIND ``mlp`` / ``cnn``,
OPTIMIZER ``sgd`` (plain SGD: every quantity) / ``adam`` (Alpha by forward mode), and FAIL_AT a
step at which rank 1 raises (to test how the others end). With ``SHORT_OF_MEMORY_RANK=r`` in the
environment, process r finds no memory for the curvature factor; with ``FAILING_REDUCTION_RANK=r``
the per-sample statistics of process r's first parameter fail at step 1.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import reference as ref
from cockpit_cli.instruments import QUANTITIES, Instruments, Schedule, curvature_memory, sample_pass
from cockpit_cli.instruments.sync import GroupSynchronizer, Synchronizer

warnings.filterwarnings("ignore")

N = 8
STEPS = 3
DECAY = 0.3
EVERYTHING = {
    "GradHist1d": {"bins": 11, "range": (-0.5, 0.5), "adaptive": True},  # from step 1 on: the largest |g_id| of all processes
    "GradHist2d": {"bins": (7, 5), "range": ((-0.5, 0.5), (-1.0, 1.0))},
}
PLAIN_SGD_ONLY = ("CABS", "EarlyStopping")


def main(out: str, kind: str, optimizer_name: str, fail_at: int | None) -> None:
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
        sync: Synchronizer = GroupSynchronizer(dist.new_group(backend="gloo"))
    else:
        sync = Synchronizer()
    if os.environ.get("SHORT_OF_MEMORY_RANK") == str(sync.rank):  # this process finds no memory for the curvature
        curvature_memory.available_bytes = lambda device: 0
    if os.environ.get("FAILING_REDUCTION_RANK") == str(sync.rank):
        fail_first_statistics_at(1)
    model = ref.mlp(0) if kind == "mlp" else ref.cnn(0)
    params = ref.trainable(model)
    decayed = ref.weights(model)
    optimizer = torch.optim.SGD(params, lr=0.1) if optimizer_name == "sgd" else torch.optim.Adam(params, lr=0.01)
    names = [name for name in QUANTITIES if name != "Time" and (optimizer_name == "sgd" or name not in PLAIN_SGD_ONLY)]
    quantities = [QUANTITIES[name](Schedule(), EVERYTHING.get(name)) for name in names]
    batches = [ref.batch(kind, "ce", N, 100 + step) for step in range(STEPS)]
    first = batches[0]
    instruments = Instruments(model, first.loss_fn, first.per_sample_loss_fn, optimizer, quantities, weight_decay=DECAY, decayed_parameters=decayed, sync=sync)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    records: dict[int, dict] = {}
    for step, (inputs, targets, *_) in enumerate(batches):
        if distributed:
            size = N // sync.world_size
            inputs, targets = inputs[sync.rank * size : (sync.rank + 1) * size], targets[sync.rank * size : (sync.rank + 1) * size]
        if fail_at == step and sync.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        optimizer.zero_grad()
        outputs = trained(inputs)
        loss = first.loss_fn(outputs, targets) + ref.regularizer(decayed, DECAY)
        instruments.backward(step, loss, inputs, outputs, targets)
        optimizer.step()
        instruments.after_update(step)
        records.update(instruments.completed(step))
    records.update(instruments.finish())
    if sync.rank == 0:
        with open(out, "w", encoding="utf-8") as file:
            json.dump({"records": records, "unavailable": instruments.unavailable}, file, default=lambda value: value.tolist())
    if distributed:
        del trained, instruments  # the wrapper holds the process group: free it before the group goes
        gc.collect()
        dist.destroy_process_group()


def fail_first_statistics_at(step: int) -> None:
    """Make the per-sample statistics of the first parameter reduced at ``step`` raise."""
    original, calls = sample_pass.sample_statistics, []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(None)
        if len(calls) == 1 + step * len(ref.trainable(ref.mlp(0))):  # the tiny models' parameters are reduced every step
            raise RuntimeError("statistics fail on purpose")
        return original(*args, **kwargs)

    sample_pass.sample_statistics = failing


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
