"""Fan a benchmark out to Ray workers (one model load each) and gather rows in benchmark order.

Determinism: the driver cuts the benchmark into fixed batches (benchmark order, batch_size) before
any worker exists; a worker only ever answers a whole planned batch with greedy decoding, and
``ActorPool.map`` returns results in submission order. A sample's reply therefore depends on its
batch, never on which worker ran it or how many there were.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Collection, Optional, Sequence

from aov_dist.eval.benchmark import Benchmark
from aov_dist.cluster.config import ClusterConfig
from aov_dist.eval.predictor import Backend, Predictor

log = logging.getLogger(__name__)

Task = tuple[str, list[Any]]


def plan(bench: Benchmark, tasks: Sequence[str], batch_size: int) -> list[Task]:
    out: list[Task] = []
    for task in ("detection", "reasoning"):
        if task not in tasks:
            continue
        items = bench.detection if task == "detection" else bench.reasoning
        out += [(task, list(items[i:i + batch_size])) for i in range(0, len(items), batch_size)]
    return out


class _Worker:
    """Ray actor body: builds its Predictor (and model) once, then answers planned batches."""

    def __init__(self, backend_factory: Callable[[], Backend], root: str, max_image_side: int,
                 map_indices: Collection[int] = ()):
        # Workers share the node's cores: one intra-op thread each unless the user says otherwise.
        if "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(1)
        self.predictor = Predictor(backend_factory, root, max_image_side, map_indices)

    def run(self, task: str, items: list[Any]) -> list[dict[str, Any]]:
        return self.predictor.run(task, items)


def _split(tasks: list[Task], results: list[list[dict]]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"detection": [], "reasoning": []}
    for (task, _), res in zip(tasks, results):
        rows[task].extend(res)
    rows["detection"].sort(key=lambda r: r["index"])
    rows["reasoning"].sort(key=lambda r: (r["index"], r["turn"]))
    return rows


def run_in_process(bench: Benchmark, tasks: Sequence[str], batch_size: int,
                   backend_factory: Callable[[], Backend], max_image_side: int = 1024,
                   map_indices: Collection[int] = ()) -> dict[str, list[dict]]:
    """Same plan, no Ray: the reference path (and num_workers=0). ``map_indices``: detection
    records whose expert map is returned in their row (``anomaly_map``)."""
    planned = plan(bench, tasks, batch_size)
    predictor = Predictor(backend_factory, bench.root, max_image_side, map_indices)
    return _split(planned, [predictor.run(t, items) for t, items in planned])


def run_distributed(bench: Benchmark, tasks: Sequence[str], batch_size: int, num_workers: int,
                    backend_factory: Callable[[], Backend], cluster: Optional[ClusterConfig] = None,
                    max_image_side: int = 1024, map_indices: Collection[int] = ()) -> dict[str, list[dict]]:
    if num_workers == 0:
        return run_in_process(bench, tasks, batch_size, backend_factory, max_image_side, map_indices)
    import ray
    from ray.util import ActorPool

    cluster = cluster or ClusterConfig()
    planned = plan(bench, tasks, batch_size)
    if not ray.is_initialized():
        ray.init(address=cluster.address)
    n = max(1, min(num_workers, len(planned)))
    options: dict[str, Any] = {"num_cpus": cluster.cpus_per_worker, "num_gpus": 1 if cluster.use_gpu else 0}
    if cluster.env:  # per actor, so it applies even when Ray was started by someone else
        options["runtime_env"] = {"env_vars": {str(k): str(v) for k, v in cluster.env.items()}}
    actor_cls = ray.remote(_Worker).options(**options)
    map_indices = frozenset(map_indices)
    actors = [actor_cls.remote(backend_factory, bench.root, max_image_side, map_indices) for _ in range(n)]
    log.info("evaluating %d batches on %d Ray workers", len(planned), n)
    try:
        pool = ActorPool(actors)
        results = list(pool.map(lambda a, t: a.run.remote(t[0], t[1]), planned))
    finally:
        for a in actors:
            ray.kill(a)
    return _split(planned, results)
