"""Checkpoint layout, commit marker and discovery (local paths or s3:// through fsspec).

    <storage>/<run_name>/step_<N>/
        ds/                  DeepSpeed's sharded state (every rank's ZeRO partitions + optimizer + scheduler)
        loader/rank_<r>.json the streaming loader's state of every rank
        rng/rank_<r>.json    python / numpy / torch RNG states of every rank
        trainer_state.json   step, epoch, per-step losses so far
        config.yaml          the job's resolved config (aov-export rebuilds the model from it)
        hf/                  consolidated HF-format model + processor (what evaluation loads)
        COMMITTED            written last, by rank 0, after every rank finished writing

A folder without COMMITTED is never loaded (a crash mid-save leaves exactly that), and older
checkpoints are deleted only after a newer one is committed.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import time
from typing import Any, Collection, Optional

import numpy as np
import torch

from aov_dist import storage

COMMIT_MARKER = "COMMITTED"
CONFIG_FILE = "config.yaml"
HF_DIR = "hf"
_STEP_DIR = re.compile(r"step_(\d+)$")


def run_dir(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}"


def step_dir(storage_path: str, run_name: str, step: int) -> str:
    return f"{run_dir(storage_path, run_name)}/step_{step}"


def step_of(path: str) -> Optional[int]:
    m = _STEP_DIR.search(path.rstrip("/"))
    return int(m.group(1)) if m else None


def is_committed(path: str) -> bool:
    return storage.exists(f"{path.rstrip('/')}/{COMMIT_MARKER}")


def list_steps(storage_path: str, run_name: str) -> list[tuple[int, str, bool]]:
    """(step, folder, committed) of every step folder of the run, oldest first."""
    root = run_dir(storage_path, run_name)
    if not storage.exists(root):
        return []
    found = []
    for name in storage.list_names(root):
        step = step_of(name)
        if step is not None:
            path = f"{root}/step_{step}"
            found.append((step, path, is_committed(path)))
    return sorted(found)


def latest_committed(storage_path: str, run_name: str) -> Optional[str]:
    """The run's committed checkpoint with the highest step (the one rule for "latest")."""
    committed = [path for _, path, ok in list_steps(storage_path, run_name) if ok]
    return committed[-1] if committed else None


def latest_committed_under(root: str) -> Optional[str]:
    """The newest committed checkpoint below ``root``: ``root`` is a run folder (``step_<N>``
    inside) or holds run folders. Within a run the highest step wins; between runs, the run
    whose latest checkpoint was committed last."""
    root = root.rstrip("/") if storage.is_remote(root) else os.path.abspath(storage.local_path(root))
    runs = [root] + [f"{root}/{name}" for name in storage.list_names(root) if step_of(name) is None]
    latest = [p for p in (latest_committed(*run.rsplit("/", 1)) for run in runs) if p]
    if not latest:
        return None
    return max(latest, key=lambda p: (_commit_time(p), step_of(p) or -1))


def _commit_time(step_folder: str) -> float:
    """When the marker was written: its own record, else (a hand-made marker) the file's time."""
    marker = f"{step_folder}/{COMMIT_MARKER}"
    try:
        return float(read_json(marker)["time"])
    except (ValueError, KeyError, TypeError):
        return storage.modified(marker)


def resume_point(train) -> Optional[str]:
    """The one rule for where a job resumes (``train`` is the config's train section):
    ``train.resume_from`` when given, else the run's newest committed checkpoint when
    ``train.resume``, else nothing (a fresh start)."""
    if train.resume_from:
        return train.resume_from
    return latest_committed(train.storage_path, train.run_name) if train.resume else None


# What a resumed job must share with the job that wrote the checkpoint, and why.
_RESUME_KEYS = {
    "stage.name": "a checkpoint of one stage does not continue as another: start the next stage with "
                  "stage.init_from=<this step folder> and a new train.run_name",
    "model.preset": "the parameters would not match",
    "deepspeed.zero_stage": "ZeRO-2 and ZeRO-3 files are laid out differently",
    "stage.global_batch_size": "the sample order and the schedule are counted in global batches",
    "data.micro_batch_size": "the micro-batches of every step would differ",
}


def written_by(step_folder: str) -> int:
    """How many workers wrote a checkpoint: a job on another number resumes it resharded."""
    return int(read_json(f"{step_folder}/trainer_state.json")["world_size"])


def check_resume(cfg, step_folder: str) -> None:
    """Raise ConfigError naming the first key in which ``cfg`` differs from the job that wrote
    ``step_folder`` (its config.yaml), with what to set. The number of workers may differ: the
    job then resumes resharded (checkpointing.restore)."""
    from omegaconf import OmegaConf

    from aov_dist.config import ConfigError

    if not storage.exists(f"{step_folder}/{CONFIG_FILE}"):
        return  # a checkpoint written before the config was saved with it: nothing to compare
    saved = OmegaConf.create(storage.read_bytes(f"{step_folder}/{CONFIG_FILE}").decode())
    now = OmegaConf.structured(cfg)
    for key, why in _RESUME_KEYS.items():
        was, want = OmegaConf.select(saved, key), OmegaConf.select(now, key)
        if was != want:
            raise ConfigError(key, f"{want!r}, but {step_folder} was written with {key}={was!r} ({why}); set "
                              f"{key}={was} to resume it, or start a new run (another train.run_name, or "
                              f"train.resume=false)")
    workers = written_by(step_folder)
    if cfg.deepspeed.zero_stage != 3 and workers != cfg.cluster.num_workers:
        raise ConfigError("cluster.nodes", f"{step_folder} was written by {workers} workers and this job has "
                          f"{cfg.cluster.num_workers} (cluster.nodes x cluster.workers_per_node): ZeRO-2 "
                          f"checkpoints resume on the number of workers that wrote them (resharding is "
                          f"ZeRO-3's): resume on {workers} workers")


def write_marker(path: str, step: int, world_size: int) -> None:
    body = {"step": step, "world_size": world_size, "time": time.time()}
    storage.write_bytes(f"{path}/{COMMIT_MARKER}", json.dumps(body).encode())


def prune(storage_path: str, run_name: str, keep: int, keep_steps: Collection[int] = ()) -> list[str]:
    """Delete all but the newest ``keep`` committed checkpoints and the steps in ``keep_steps``
    (not yet evaluated, the best one so far: tracking decides), and uncommitted folders older than
    the newest committed one (leftovers of interrupted saves). Called only after a commit."""
    steps = list_steps(storage_path, run_name)
    committed = [(s, p) for s, p, ok in steps if ok]
    if not committed:
        return []
    newest = committed[-1][0]
    doomed = [p for s, p in committed[:-keep] if s not in keep_steps]
    doomed += [p for s, p, ok in steps if not ok and s < newest]
    for path in doomed:
        storage.remove_tree(path)
    return doomed


def write_json(url: str, obj: Any) -> None:
    storage.write_bytes(url, json.dumps(obj).encode())


def read_json(url: str) -> Any:
    return json.loads(storage.read_bytes(url))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device


def reseed(seed: int, step: int, rank: int) -> None:
    """RNG streams of a rank that resumes on another world size (the saved streams belong to the
    old ranks): a function of (seed, step, rank), so such a resume is reproducible too."""
    seed_everything(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def rng_state() -> dict[str, Any]:
    """JSON-safe RNG states (no pickles in checkpoints)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this worker's current device
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    if "cuda" in state and torch.cuda.is_available():
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw))
