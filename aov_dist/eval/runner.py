"""Fan a benchmark out to Ray workers (one model load each) and gather rows in benchmark order.

Determinism: the driver cuts the benchmark into fixed batches (benchmark order, batch_size) before
any worker exists; a worker only ever answers a whole planned batch with greedy decoding, and
``ActorPool.map`` returns results in submission order. A sample's reply therefore depends on its
batch, never on which worker ran it or how many there were.

Reuse: a ``WorkerPool`` keeps its actors (processes with torch, transformers and Ray already
imported) across evaluations and only tells them to load the next checkpoint: starting actors
cost 7-14 s per evaluation on 2 shared cores (docs/benchmarks.md), a reload far less.
Its actors hold their CPUs (and GPUs) while alive: the caller closes it before training needs them.
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
    """Ray actor body: loads a checkpoint's Predictor when told to, then answers planned batches."""

    def __init__(self) -> None:
        # Workers share the node's cores: one intra-op thread each unless the user says otherwise.
        if "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(1)
        self.predictor: Optional[Predictor] = None

    def load(self, backend_factory: Callable[[], Backend], root: str, max_image_side: int,
             map_indices: Collection[int] = ()) -> tuple[str, int]:
        """Replace the model (the old one is freed first: two would double the memory); returns
        who loaded it (Ray actor id, process id)."""
        import gc

        import ray

        self.predictor = None
        gc.collect()
        self.predictor = Predictor(backend_factory, root, max_image_side, map_indices)
        return ray.get_runtime_context().get_actor_id(), os.getpid()

    def run(self, task: str, items: list[Any]) -> list[dict[str, Any]]:
        if self.predictor is None:
            raise RuntimeError("evaluation worker: run() before a successful load()")
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


class WorkerPool:
    """Evaluation actors that live across evaluations (created on first use, ``close`` kills them).

    ``run`` loads the given backend on the actors it needs, then maps the planned batches over them
    in submission order, exactly as a fresh pool would. An actor that died, or a Ray instance that
    was restarted since, makes the pool start new actors (once per call)."""

    def __init__(self, num_workers: int, cluster: Optional[ClusterConfig] = None):
        if num_workers < 1:
            raise ValueError(f"WorkerPool: num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.cluster = cluster or ClusterConfig()
        self.actors: list[Any] = []
        # (Ray actor id, pid) of the actors that loaded the last checkpoint, in plan order
        self.loaded_by: list[tuple[str, int]] = []
        self._ray_id: Optional[tuple[str, str]] = None  # (node, job) the actors were created in

    @staticmethod
    def _current_ray() -> tuple[str, str]:
        import ray

        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ctx.get_job_id()

    def _ensure(self) -> list[Any]:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.cluster.address)
        if self.actors and self._ray_id != self._current_ray():
            self.actors = []  # they belonged to a Ray instance that is gone
        if not self.actors:
            c = self.cluster
            options: dict[str, Any] = {"num_cpus": c.cpus_per_worker, "num_gpus": 1 if c.use_gpu else 0}
            if c.env:  # per actor, so it applies even when Ray was started by someone else
                options["runtime_env"] = {"env_vars": {str(k): str(v) for k, v in c.env.items()}}
            actor_cls = ray.remote(_Worker).options(**options)
            self.actors = [actor_cls.remote() for _ in range(self.num_workers)]
            self._ray_id = self._current_ray()
        return self.actors

    def run(self, planned: list[Task], backend_factory: Callable[[], Backend], root: str,
            max_image_side: int = 1024, map_indices: Collection[int] = ()) -> list[list[dict]]:
        """One result list per planned batch, in plan order."""
        import ray
        from ray.exceptions import RayActorError

        map_indices = frozenset(map_indices)
        for attempt in (1, 2):
            actors = self._ensure()[:max(1, min(self.num_workers, len(planned)))]
            try:
                # in parallel: every actor reads the checkpoint and builds its model at once
                self.loaded_by = ray.get([a.load.remote(backend_factory, root, max_image_side, map_indices)
                                     for a in actors])
                break
            except RayActorError:
                self.close()  # a dead actor (killed, OOM) or a Ray restart: start over once
                if attempt == 2:
                    raise
        log.info("evaluating %d batches on %d Ray workers", len(planned), len(actors))
        from ray.util import ActorPool

        try:
            return list(ActorPool(actors).map(lambda a, t: a.run.remote(t[0], t[1]), planned))
        except RayActorError:
            self.close()  # the next evaluation gets fresh actors
            raise

    def close(self) -> None:
        import ray

        actors, self.actors = self.actors, []
        if actors and ray.is_initialized() and self._ray_id == self._current_ray():
            for a in actors:
                ray.kill(a)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_distributed(bench: Benchmark, tasks: Sequence[str], batch_size: int, num_workers: int,
                    backend_factory: Callable[[], Backend], cluster: Optional[ClusterConfig] = None,
                    max_image_side: int = 1024, map_indices: Collection[int] = (),
                    pool: Optional[WorkerPool] = None) -> dict[str, list[dict]]:
    """``pool``: reuse its live actors (its size wins over ``num_workers``); without one a pool is
    started for this call and closed after it."""
    if pool is None and num_workers == 0:
        return run_in_process(bench, tasks, batch_size, backend_factory, max_image_side, map_indices)
    planned = plan(bench, tasks, batch_size)
    if pool is not None:
        return _split(planned, pool.run(planned, backend_factory, bench.root, max_image_side, map_indices))
    with WorkerPool(max(1, min(num_workers, len(planned))), cluster) as own:
        return _split(planned, own.run(planned, backend_factory, bench.root, max_image_side, map_indices))
