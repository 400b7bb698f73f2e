"""Resume on another number of workers: real DeepSpeed ZeRO-3 on gloo ranks, spawned and under Ray.

4 workers train 8 steps (global batch 12, micro-batch 1: 3 micro-batches per rank and step) and
commit step 4 and step 8. Jobs on 2 and on 3 workers resume the step-4 checkpoint (DeepSpeed's
universal form of the ZeRO files, gradient accumulation 6 and 4), and 4 workers resume the
2-worker job's step 6: each must give the uninterrupted run's losses for the steps it trains and
its final weights, and train on exactly the samples the uninterrupted run used in each of those
global batches (a ledger of sample ids per step).

Under Ray Train (elastic, ``cluster.min_workers=2``): a 4-worker job on a two-node Ray cluster loses
one node for good after committing step 4 and must finish on the 2 workers left, with the same
guarantees. The removal is not raced: a worker setup hook parks every rank of the 4-worker group
at the start of step 5 (so the job cannot finish first); the test removes the node once step 4 is
committed and registered with Ray and all four ranks are parked.
"""
from __future__ import annotations

import json
import os
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from train_harness import assert_states_close, hf_state, run_ranks, tiny_overrides, train_rank, typed_cfg

pytestmark = pytest.mark.slow
GLOBAL, STEPS, SAVED = 12, 8, 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """Enough samples that the 8 global batches are one epoch, every one usable in stage 1 (single
    images, labelled): no replacement from the refill sequence, so no sample may appear twice."""
    from aov_dist.data.shards import write_shards
    from aov_dist.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("elastic_data")
    res = generate(SynthConfig(out=str(root / "raw"), seed=3, num_train=100, num_bench=4, image_size=64,
                                   multiview_fraction=0.0))
    write_shards([res.train_json], str(root / "shards"), image_root=res.image_root, shard_size_mb=0.2)
    return str(root / "shards" / "manifest.json")


class LedgerTask:
    """A stage task whose loader reports the sample ids of every micro-batch (``record(ids)``) and
    whose loss calls ``on_loss(count)`` first (the Ray test parks workers there)."""

    def __init__(self, task, record, on_loss=None):
        self._task, self._record, self._on_loss, self._calls = task, record, on_loss, 0

    def __getattr__(self, name):
        return getattr(self._task, name)

    def build_loader(self, cfg, processor, rank, world):
        loader = self._task.build_loader(cfg, processor, rank, world)
        transform, collate = loader.settings.transform, loader.collate
        loader.settings.transform = lambda s: (s["id"], transform(s))

        def collate_ids(items):
            self._record([i for i, _ in items])
            return collate([x for _, x in items])

        loader.collate = collate_ids
        return loader

    def loss(self, engine, batch):
        self._calls += 1
        if self._on_loss is not None:
            self._on_loss(self._calls)
        return self._task.loss(engine, batch)


def ledger_rank(cfg, rank: int, world: int, **kwargs) -> dict:
    """``train_rank``, also returning the sample ids of every micro-batch this rank trained on."""
    from aov_dist.train.tasks import make_task

    ids: list[list[str]] = []
    out = train_rank(cfg, rank, world, task=LedgerTask(make_task(cfg.stage.name), ids.append), **kwargs)
    return {**out, "ids": ids}


def steps_ledger(result: list[dict]) -> list[list[str]]:
    """Per optimizer step, the ids of its global batch in place order (ranks in order)."""
    world = len(result)
    accum = GLOBAL // world
    n = len(result[0]["ids"]) // accum
    return [[i for r in range(world) for mb in result[r]["ids"][s * accum:(s + 1) * accum] for i in mb]
            for s in range(n)]


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    cache: dict[str, list[dict]] = {}

    def run(name: str, world: int, extra: tuple[str, ...] = ()) -> list[dict]:
        if name not in cache:
            cfg = typed_cfg(tiny_overrides(manifest, root / name, world=world, num_workers=0, steps=STEPS,
                                           global_batch=GLOBAL, micro=1, run_name=name,
                                           extra=[f"train.checkpoint_every_steps={SAVED}", *extra]))
            cache[name] = run_ranks(cfg, root / f"{name}_out", rank_fn=partial(ledger_rank), deadline_s=600)
        return cache[name]

    return run


def _resumed_from_step4(runs, world: int) -> list[dict]:
    """The uninterrupted 4-worker run's step 4, resumed on ``world`` workers (saving every 2 steps)."""
    step4 = runs("w4", 4)[0]["checkpoints"][0]
    assert Path(step4).name == f"step_{SAVED}"
    return runs(f"w4_to_w{world}", world, (f"train.resume_from='{step4}'", "train.checkpoint_every_steps=2",
                                           "train.keep_checkpoints=3"))


@pytest.mark.parametrize("world", [2, 3])
def test_a_checkpoint_of_4_workers_resumes_on_fewer_with_the_same_losses_weights_and_samples(runs, world):
    full = runs("w4", 4)
    step4 = full[0]["checkpoints"][0]
    resumed = _resumed_from_step4(runs, world)
    assert all(r["resumed_from"] == step4 for r in resumed)
    assert resumed[0]["losses"][:SAVED] == full[0]["losses"][:SAVED]  # restored, not retrained
    assert resumed[0]["losses"] == pytest.approx(full[0]["losses"], rel=1e-5)
    for a, b in zip(full[0]["metrics"][SAVED:], resumed[0]["metrics"]):
        assert a["lr/expert"] == pytest.approx(b["lr/expert"], rel=1e-9)  # the schedule goes on
    assert_states_close(hf_state(resumed[0]["checkpoints"][-1]), hf_state(full[0]["checkpoints"][-1]),
                        rtol=1e-4, atol=1e-5)
    # the ledger: steps 5-8 train on the uninterrupted run's global batches, place by place, and
    # the 8 global batches hold every sample of them exactly once
    before, after, uninterrupted = steps_ledger(full)[:SAVED], steps_ledger(resumed), steps_ledger(full)
    assert len(after) == STEPS - SAVED and after == uninterrupted[SAVED:]
    every = [i for step in before + after for i in step]
    assert len(every) == STEPS * GLOBAL == len(set(every))


def test_a_checkpoint_of_2_workers_resumes_on_4_with_the_same_losses_weights_and_samples(runs):
    full = runs("w4", 4)
    [step6] = [c for c in _resumed_from_step4(runs, 2)[0]["checkpoints"] if Path(c).name == "step_6"]
    back = runs("w4_to_w2_to_w4", 4, (f"train.resume_from='{step6}'",))
    assert back[0]["resumed_from"] == step6
    assert back[0]["losses"] == pytest.approx(full[0]["losses"], rel=1e-5)
    assert_states_close(hf_state(back[0]["checkpoints"][-1]), hf_state(full[0]["checkpoints"][-1]),
                        rtol=1e-4, atol=1e-5)
    assert steps_ledger(back) == steps_ledger(full)[6:]


# ---- Ray Train: a node removed for good ----

HOOK_DIR_ENV = "AOV_TEST_ELASTIC_DIR"
WAIT_S = 420


def ledger_and_park_first_group() -> None:
    """Ray worker-process setup hook: every rank records its micro-batches' sample ids in
    ``<dir>/ids_w<world>_r<rank>.jsonl``; the ranks of the 4-worker group park (sleep until the
    test removes their node, or Ray stops them) at the first forward of step SAVED + 1."""
    hook_dir = os.environ.get(HOOK_DIR_ENV)
    if not hook_dir:
        return
    from aov_dist.train import loop

    real_make_task = loop.make_task

    def make_task(name):
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        accum = GLOBAL // world

        def record(ids):
            with open(Path(hook_dir, f"ids_w{world}_r{rank}.jsonl"), "a") as f:
                f.write(json.dumps(ids) + "\n")

        def park(calls):
            if world == 4 and calls == SAVED * accum + 1:
                Path(hook_dir, f"parked_{rank}").write_text(str(os.getpid()))
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:
                    time.sleep(0.5)
                os._exit(3)  # never stopped: fail this attempt (the test then fails)

        return LedgerTask(real_make_task(name), record, park)

    loop.make_task = make_task


def _remove_node_when_parked(cluster, node, hook_dir: Path, step4: str, record: dict) -> None:
    from train_harness import act_once_committed

    act_once_committed(lambda: len(list(hook_dir.glob("parked_*"))) == 4, step4,
                       lambda: cluster.remove_node(node, allow_graceful=False), record, WAIT_S)


def test_a_ray_job_that_loses_a_node_finishes_on_the_workers_left(runs, manifest, tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from aov_dist.train import checkpoint as ckpt
    from aov_dist.train.driver import main
    from train_harness import compose_cfg, install_worker_setup_hook

    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    install_worker_setup_hook(monkeypatch, __file__, "ledger_and_park_first_group", {HOOK_DIR_ENV: str(hook_dir)})
    # Ray's first restart still counts the removed node's CPUs and waits this long for 4 workers
    # before it sizes the group by what is left (default 60 s)
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    storage = tmp_path / "runs"
    step4 = ckpt.step_dir(str(storage), "elastic", SAVED)
    record: dict = {}
    remover = threading.Thread(target=_remove_node_when_parked, args=(cluster, node, hook_dir, step4, record),
                               daemon=True)
    remover.start()
    try:
        overrides = tiny_overrides(manifest, storage, world=4, num_workers=0, steps=STEPS, global_batch=GLOBAL,
                                   micro=1, run_name="elastic",
                                   extra=[f"train.checkpoint_every_steps={SAVED}", "cluster.min_workers=2",
                                          "cluster.max_failures=1", "train.resume=false",
                                          f"cluster.address='{cluster.address}'"])
        result = main(compose_cfg(overrides), show_progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    remover.join(timeout=5)
    assert record.get("done"), record
    full = runs("w4", 4)
    # resumed from step 4 on the 2 workers left, through the checkpoint Ray handed back
    assert result.resumed_from == step4 and ckpt.is_committed(result.latest_checkpoint)
    assert result.losses == pytest.approx(full[0]["losses"], rel=1e-5)
    assert_states_close(hf_state(result.latest_checkpoint), hf_state(full[0]["checkpoints"][-1]),
                        rtol=1e-4, atol=1e-5)
    after = [[json.loads(line) for line in (hook_dir / f"ids_w2_r{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert not list(hook_dir.glob("ids_w3_*"))  # the group restarted on 2 workers
    assert steps_ledger([{"ids": ids} for ids in after]) == steps_ledger(full)[SAVED:]
