"""The streaming loader's state: progress as (epoch, global batches done), valid for every layout.

The order of samples depends on the settings below (plan.py), never on the world size, the rank or
the number of DataLoader workers, so those three are recorded only to know whose counts a state
holds. A state whose order settings differ from the loader's is refused naming the key to set.
"""
from __future__ import annotations

from typing import Any

STATE_VERSION = 2

# state key -> the config key that sets it
ORDER_KEYS = {
    "seed": "data.seed",
    "datasets": "data.datasets",
    "stage": "stage",
    "block_size": "data.block_size",
    "samples_per_epoch": "data.samples_per_epoch",
    "global_batch_size": "stage.global_batch_size",
    "micro_batch_size": "data.micro_batch_size",
}


def order_settings(loader: Any) -> dict:
    """What fixes a loader's order of samples (JSON values, compared as they are)."""
    cfg = loader.cfg
    return {
        "seed": cfg.seed,
        "datasets": [{"name": ix.name, "samples": ix.total, "weight": float(d.weight)}
                     for ix, d in zip(loader.settings.indexes, cfg.datasets)],
        "stage": loader.settings.stage,
        "block_size": cfg.block_size,
        "samples_per_epoch": cfg.samples_per_epoch,
        "global_batch_size": loader.global_batch_size,
        "micro_batch_size": cfg.micro_batch_size,
    }


def state_of(loader: Any, epoch: int, global_batches_done: int) -> dict:
    return {
        "version": STATE_VERSION,
        "epoch": epoch,
        "global_batches_done": global_batches_done,
        "global_batches_per_epoch": loader.settings.plan.global_batches,
        **order_settings(loader),
        "rank": loader.rank,
        "world_size": loader.world_size,
        "skipped": dict(loader.skipped),
        "filtered": dict(loader.filtered),
    }


def check_state(loader: Any, state: dict) -> None:
    """Raise ValueError unless ``loader`` can continue ``state`` exactly."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}: this "
                         "loader cannot continue it (start the data stream afresh)")
    for key, want in order_settings(loader).items():
        if state.get(key) != want:
            raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has {want!r}: "
                             f"set {ORDER_KEYS[key]} as the state's run had it to continue it exactly "
                             "(or start the data stream afresh)")
    planned = loader.settings.plan.global_batches
    if state.get("global_batches_per_epoch") != planned or not 0 <= state.get("global_batches_done", -1) <= planned:
        raise ValueError(f"loader state has global_batches_per_epoch={state.get('global_batches_per_epoch')!r} "
                         f"(done {state.get('global_batches_done')!r}), this loader plans {planned}: the "
                         "manifests' shards changed since (set data.datasets to the state's shards)")


def counts_from_state(loader: Any, state: dict) -> tuple[dict[str, int], dict[str, int]]:
    """This rank's skip / filter counts in ``state``: restored when the state is this rank's own
    (same rank and world size), zero otherwise."""
    if state.get("rank") == loader.rank and state.get("world_size") == loader.world_size:
        return ({k: int(v) for k, v in state.get("skipped", {}).items()},
                {k: int(v) for k, v in state.get("filtered", {}).items()})
    return {}, {}
