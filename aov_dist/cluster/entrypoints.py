"""The command lines a cluster runs, built in one place for `ray job submit` and for KubeRay.

Both `launch/submit.py` and `aov_dist.cluster.k8s` call these functions, so the entry point a
RayJob runs is exactly the one `make launch` submits.
"""
from __future__ import annotations

import shlex
from typing import Sequence

TRAIN_MODULE = "aov_dist.train"
EVAL_MODULE = "aov_dist.eval"
PROBE_MODULE = "aov_dist.cluster.probe"
# Keys of the trainer's and tracker's sections that the Kubernetes manifests pin
# (fixed run name -> the same checkpoint folder after a RayJob is recreated).
STORAGE_KEY = "train.storage_path"
RUN_NAME_KEY = "train.run_name"
TRACKING_URI_KEY = "tracking.uri"
KEEP_UNEVALUATED_KEY = "train.keep_unevaluated"
EVAL_CHECKPOINT_ROOT_KEY = "eval.checkpoint_root"
EVAL_WORKERS_KEY = "eval.num_workers"


def _override_keys(overrides: Sequence[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def train_command(preset: str, nodes: int, overrides: Sequence[str] = ()) -> list[str]:
    """`python -m aov_dist.train cluster=<preset> cluster.nodes=<n> <overrides...>`."""
    return ["python", "-m", TRAIN_MODULE, f"cluster={preset}", f"cluster.nodes={nodes}", *overrides]


def eval_watch_command(preset: str, nodes: int, num_workers: int, overrides: Sequence[str] = ()) -> list[str]:
    """`python -m aov_dist.eval mode=watch cluster=<preset> cluster.nodes=<n> ...`.

    The evaluation fans out to `eval.num_workers` actors; unless the caller chose a number, use
    every worker slot of the cluster (nodes x workers_per_node).
    """
    keys = _override_keys(overrides)
    extra = [] if keys & {EVAL_WORKERS_KEY, "num_workers"} else [f"{EVAL_WORKERS_KEY}={num_workers}"]
    return ["python", "-m", EVAL_MODULE, "mode=watch", f"cluster={preset}", f"cluster.nodes={nodes}",
            *extra, *overrides]


def probe_command(preset: str, nodes: int, overrides: Sequence[str] = ()) -> list[str]:
    """A trivial Ray Train job that reports which node each worker ran on (cluster smoke test)."""
    return ["python", "-m", PROBE_MODULE, f"cluster={preset}", f"cluster.nodes={nodes}", *overrides]


def as_shell(cmd: Sequence[str]) -> str:
    """One shell string (Ray and KubeRay run the entry point through a shell)."""
    return shlex.join(cmd)
