"""Cluster smoke test: a Ray Train job shaped exactly like training, minus the model.

    python -m aov_dist.cluster.probe cluster=h100 cluster.nodes=2 --storage s3://bucket/probe
    python launch/submit.py probe --cluster local --nodes 2 -- cluster.workers_per_node=1 ...

It starts nodes x workers_per_node Ray Train workers with the cluster section's ScalingConfig
and backend, all-reduces each rank's (rank + 1) across the process group, and prints one line
``AOV_PROBE {json}`` with every worker's node id, host and the all-reduce result. It exits 1
when the workers did not land on ``cluster.nodes`` distinct nodes or the sum is wrong, so a
wrong placement or a broken network between nodes shows up before a long training run does.
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


def _worker_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    value = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(value)
    info = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "allreduce": float(value.item()),
            "env": {k: os.environ.get(k) for k in config["env_keys"]}}
    ray.get(config["collector"].add.remote(info))


def run_probe(cfg: ClusterConfig, storage_path: str) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address=cfg.address, runtime_env=runtime_env(cfg))

    @ray.remote(num_cpus=0)
    class Collector:
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def add(self, row: dict[str, Any]) -> None:
            self.rows.append(row)

        def get(self) -> list[dict[str, Any]]:
            return self.rows

    collector = Collector.remote()
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"collector": collector, "env_keys": sorted(cfg.env)},
        scaling_config=scaling_config(cfg), torch_config=TorchConfig(backend=cfg.backend),
        run_config=RunConfig(name=f"aov-probe-{int(time.time())}", storage_path=storage_path))
    trainer.fit()
    workers = sorted(ray.get(collector.get.remote()), key=lambda r: r["rank"])
    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    return {"workers": workers, "cluster_nodes": alive, "expected_nodes": cfg.nodes,
            "expected_workers": cfg.num_workers}


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
