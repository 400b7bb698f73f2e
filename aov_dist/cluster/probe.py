"""Cluster smoke test: a Ray Train job shaped exactly like training, with a tiny model.

    python -m aov_dist.cluster.probe cluster=h100 cluster.nodes=2 --storage s3://bucket/probe
    python launch/submit.py probe --cluster local --nodes 2 -- cluster.workers_per_node=1 ...

It starts nodes x workers_per_node Ray Train workers with the cluster section's ScalingConfig,
backend and accelerator, and on every worker
1. all-reduces the rank's (rank + 1) on the process group's device (CUDA under NCCL), and
2. runs one training step of the tiny Anomaly-OV through the real per-worker loop
   (``run_training``: DeepSpeed ZeRO-3 on the worker's device, bf16 on GPUs, the optimizer a real
   job gets, a checkpoint every rank writes into ``--storage``), on synthetic batches.
It prints one line ``AOV_PROBE {json}`` with every worker's node id, host, all-reduce result,
loss and optimizer, and exits 1 when the workers did not land on ``cluster.nodes`` distinct nodes,
the sum is wrong, a loss is not finite or the checkpoint was not committed: a wrong placement, a
broken network, a GPU DeepSpeed cannot use or storage a node cannot write shows up before a long
training run does. The probe's checkpoint is deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any, Optional

from aov_dist.cluster.compose import compose_cluster
from aov_dist.cluster.config import ClusterConfig, validate_cluster
from aov_dist.cluster.scaling import runtime_env, scaling_config

MARKER = "AOV_PROBE "


def probe_job(cluster: ClusterConfig, storage_path: str, run_name: str):
    """The job of the probe's training step: the tiny model, stage 2, one step of one sample per
    worker, no tracking, the cluster section as given (its device, backend and precision)."""
    from aov_dist.config import TrainJobConfig
    from aov_dist.train.config import StageConfig, TrainConfig
    from aov_dist.tracking.config import TrackingConfig

    cfg = TrainJobConfig(cluster=cluster, tracking=TrackingConfig(enabled=False),
                         stage=StageConfig(name="stage2", max_steps=1, global_batch_size=cluster.num_workers,
                                           lr={"projector": 1e-5, "llm": 1e-5}, schedule="constant"),
                         train=TrainConfig(run_name=run_name, storage_path=storage_path, keep_checkpoints=1))
    cfg.data.micro_batch_size = 1
    return cfg


def _worker_loop(config: dict[str, Any]) -> None:
    import math

    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from aov_dist.devices import collective_device, worker_device
    from aov_dist.train.loop import run_training
    from aov_dist.train.synthetic import synthetic_stage2_task

    cluster = config["cluster"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    value = torch.tensor([rank + 1.0], device=collective_device(worker_device(cluster.use_gpu)))
    dist.all_reduce(value)
    result = run_training(probe_job(cluster, config["storage"], config["run_name"]), rank, world,
                          task=synthetic_stage2_task(text_len=64))
    loss = result.losses[-1] if result.losses else float("nan")
    info = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "allreduce": float(value.item()), "device": str(value.device),
            "train_loss": loss if math.isfinite(loss) else None, "optimizer": result.optimizer,
            "checkpoint": result.checkpoints[-1] if result.checkpoints else None,
            "env": {k: os.environ.get(k) for k in config["env_keys"]}}
    ray.get(config["collector"].add.remote(info))


def run_probe(cfg: ClusterConfig, storage_path: str) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from aov_dist.cluster.config import deepspeed_accelerator

    env = runtime_env(cfg) or {}
    env.setdefault("env_vars", {}).update({"DS_ACCELERATOR": deepspeed_accelerator(cfg), "RAY_CHDIR_TO_TRIAL_DIR": "0"})
    ray.init(address=cfg.address, runtime_env=env)

    @ray.remote(num_cpus=0)
    class Collector:
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def add(self, row: dict[str, Any]) -> None:
            self.rows.append(row)

        def get(self) -> list[dict[str, Any]]:
            return self.rows

    collector = Collector.remote()
    run_name = f"aov-probe-{int(time.time())}"
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"collector": collector, "env_keys": sorted(cfg.env), "cluster": cfg,
                                         "storage": storage_path, "run_name": run_name},
        scaling_config=scaling_config(cfg), torch_config=TorchConfig(backend=cfg.backend),
        run_config=RunConfig(name=run_name, storage_path=f"{storage_path.rstrip('/')}/_ray"))
    trainer.fit()
    workers = sorted(ray.get(collector.get.remote()), key=lambda r: r["rank"])
    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    committed = _committed_and_removed(storage_path, run_name, [w["checkpoint"] for w in workers])
    return {"workers": workers, "cluster_nodes": alive, "expected_nodes": cfg.nodes,
            "expected_workers": cfg.num_workers, "checkpoint_committed": committed}


def _committed_and_removed(storage_path: str, run_name: str, paths: list[Optional[str]]) -> bool:
    """Whether the probe's checkpoint was committed (every rank wrote its part); then delete the
    probe's folders: the probe leaves nothing behind in the storage."""
    from aov_dist import storage
    from aov_dist.train import checkpoint as ckpt

    committed = bool(paths) and len(set(paths)) == 1 and paths[0] is not None and ckpt.is_committed(paths[0])
    for folder in (ckpt.run_dir(storage_path, run_name), f"{storage_path.rstrip('/')}/_ray/{run_name}"):
        if storage.exists(folder):
            storage.remove_tree(folder)
    return committed


def check(report: dict[str, Any]) -> list[str]:
    """Problems in a probe report (empty = the cluster is fit for training)."""
    problems = []
    workers = report["workers"]
    n = report["expected_workers"]
    if len(workers) != n:
        problems.append(f"{len(workers)} workers reported, expected {n}")
    nodes = {w["node_id"] for w in workers}
    if len(nodes) != report["expected_nodes"]:
        problems.append(f"workers ran on {len(nodes)} node(s), expected cluster.nodes={report['expected_nodes']}")
    want = n * (n + 1) / 2
    bad = [w["rank"] for w in workers if w["allreduce"] != want]
    if bad:
        problems.append(f"all-reduce gave a wrong sum on ranks {bad} (expected {want})")
    no_loss = [w["rank"] for w in workers if w.get("train_loss") is None]
    if no_loss:
        problems.append(f"the training step gave no finite loss on ranks {no_loss}")
    if not report.get("checkpoint_committed"):
        problems.append("the training step's checkpoint was not committed (can every node write the storage?)")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aov_dist.cluster.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=os.path.abspath("ray_results"),
                        help="Ray Train storage_path (s3://... or a shared absolute path on several nodes)")
    args, overrides = parser.parse_known_args(argv)
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("cluster=")), "local")
    cfg = validate_cluster(compose_cluster(preset, None, overrides), args.storage,
                           storage_key="--storage")
    report = run_probe(cfg, args.storage)
    problems = check(report)
    report["problems"] = problems
    print(MARKER + json.dumps(report, sort_keys=True), flush=True)
    for p in problems:
        print(f"probe FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
