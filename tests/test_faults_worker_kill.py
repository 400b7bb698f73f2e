"""A training worker killed (SIGKILL) mid-run under Ray Train: a real 2-worker CPU job (driver.main,
ZeRO-3, gloo) with cluster.max_failures=1. Ray restarts the worker group, the group resumes from the
checkpoint Ray hands back (our pointer to step_2), and the run ends with exactly the losses and
weights of an uninterrupted run.

Kill timing is made deterministic, not raced: a worker-process setup hook (runtime_env
``worker_process_setup_hook``, installed only by this test) makes rank 1 of the first attempt stop
right after the forward pass of step 3, i.e. after step 2's checkpoint is committed and the next
step has started, and write its pid to a file. The test then waits until (a) step_2 has its
COMMITTED marker, (b) rank 1 is parked, (c) Ray's checkpoint manager has registered the step-2
report, finds that pid among the ``ray::RayTrainWorker`` processes with psutil and SIGKILLs it.
Rank 1 is the one killed because rank 0 then survives on its own, blocked in a collective with a
dead peer: the test proves Ray tears such a group down instead of hanging. Nothing can finish
early: the first attempt cannot pass step 3 while rank 1 is parked.

``train.resume=false``: the job itself does not look for earlier checkpoints, so the restarted
group can only resume through the checkpoint Ray hands back (loop._reported_checkpoint).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KILL_DIR_ENV = "AOV_TEST_KILL_DIR"
PAUSE_AT_STEP = 3  # rank 1 parks after this step's forward (accumulation 1: one loss call per step)
STEPS, EVERY = 4, 2
PARKED = "parked.pid"
WAIT_S = 420  # generous: a loaded 2-core machine; normally parked after ~60 s


def park_rank1_of_first_attempt() -> None:
    """Ray worker-process setup hook: wrap the stage's task so that rank 1 parks (sleeps until
    killed) after the forward of step PAUSE_AT_STEP, once per test (the parked file marks it)."""
    kill_dir = os.environ.get(KILL_DIR_ENV)
    if not kill_dir:
        return
    from aov_dist.train import loop

    real_make_task = loop.make_task

    class ParkingTask:
        def __init__(self, task):
            self._task, self._calls = task, 0

        def __getattr__(self, name):
            return getattr(self._task, name)

        def loss(self, engine, batch):
            import torch.distributed as dist

            out = self._task.loss(engine, batch)
            self._calls += 1
            parked = Path(kill_dir, PARKED)
            if self._calls == PAUSE_AT_STEP and dist.get_rank() == 1 and not parked.exists():
                tmp = Path(kill_dir, f".{PARKED}.tmp")
                tmp.write_text(str(os.getpid()))
                os.replace(tmp, parked)
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:  # the test SIGKILLs us here
                    time.sleep(0.5)
                os._exit(3)  # never killed: fail the attempt anyway (the test then fails)
            return out

    loop.make_task = lambda name: ParkingTask(real_make_task(name))


def _overrides(manifest, storage: Path) -> list[str]:
    from train_harness import tiny_overrides

    return tiny_overrides(manifest, storage, world=2, num_workers=0, steps=STEPS, global_batch=4, micro=2,
                          run_name="killed", extra=[f"train.checkpoint_every_steps={EVERY}", "train.keep_checkpoints=3",
                                                    "cluster.max_failures=1", "train.resume=false"])


def _train_workers() -> dict[int, str]:
    """pid -> command line of every Ray Train worker process on this machine (Ray sets the title)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "ray::RayTrainWorker" in cmdline:
            found[p.info["pid"]] = cmdline
    return found


def _kill_when_parked(kill_dir: Path, storage: Path, record: dict) -> None:
    """Background thread of the test: SIGKILL the parked rank 1 once step 2 is committed
    everywhere (our marker and Ray's checkpoint registry)."""
    from aov_dist.train import checkpoint as ckpt
    from train_harness import act_once_committed

    parked = kill_dir / PARKED

    def kill() -> None:
        pid = int(parked.read_text())
        record.update(pid=pid, cmdline=_train_workers().get(pid, ""),
                      steps_on_disk=ckpt.list_steps(str(storage), "killed"))
        os.kill(pid, signal.SIGKILL)

    act_once_committed(parked.exists, ckpt.step_dir(str(storage), "killed", EVERY), kill, record, WAIT_S)


@pytest.fixture
def ray_session():
    import ray

    if ray.is_initialized():  # a session left by another module would lack our setup hook
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_killed_worker_resumes_from_the_checkpoint_with_the_uninterrupted_losses_and_weights(
        tmp_path, synthetic_shards, ray_session, monkeypatch):
    from aov_dist.train import checkpoint as ckpt
    from aov_dist.train.driver import main
    from train_harness import (assert_states_close, compose_cfg, hf_state, install_worker_setup_hook, run_ranks,
                               typed_cfg)

    manifest = synthetic_shards.manifest_path
    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()
    install_worker_setup_hook(monkeypatch, __file__, "park_rank1_of_first_attempt", {KILL_DIR_ENV: str(kill_dir)})
    storage = tmp_path / "runs"
    record: dict = {}
    killer = threading.Thread(target=_kill_when_parked, args=(kill_dir, storage, record), daemon=True)
    killer.start()
    t0 = time.monotonic()
    result = main(compose_cfg(_overrides(manifest, storage)), show_progress=False)
    killer.join(timeout=5)
    assert record.get("done"), record
    # the process killed was a Ray Train worker (rank 1), after step 2 was committed
    assert "ray::RayTrainWorker" in record["cmdline"], record
    assert [(s, ok) for s, _, ok in record["steps_on_disk"]] == [(EVERY, True)]
    run_dir = ckpt.run_dir(str(storage), "killed")
    # resumed from the checkpoint committed before the kill: the lost work is step 3 only
    assert result.resumed_from == f"{run_dir}/step_{EVERY}", result.resumed_from
    assert ckpt.is_committed(result.resumed_from)
    assert result.latest_checkpoint == f"{run_dir}/step_{STEPS}"
    assert [(s, ok) for s, _, ok in ckpt.list_steps(str(storage), "killed")] == [(2, True), (4, True)]
    interrupted_s = time.monotonic() - t0

    # the same job, uninterrupted (no Ray: the same run_training on 2 spawned gloo ranks)
    ref = run_ranks(typed_cfg(_overrides(manifest, tmp_path / "ref")), tmp_path / "ref_out")
    assert len(result.losses) == STEPS
    # same tolerance as test_train_golden's resume test (rel 1e-5)
    assert result.losses == pytest.approx(ref[0]["losses"], rel=1e-5), (result.losses, ref[0]["losses"])
    assert json.loads(Path(result.latest_checkpoint, "trainer_state.json").read_text())["losses"] == result.losses
    assert_states_close(hf_state(result.latest_checkpoint), hf_state(ref[0]["checkpoints"][-1]), rtol=1e-5, atol=1e-7)
    print(f"interrupted run {interrupted_s:.0f} s; losses {result.losses} vs {ref[0]['losses']}")


STALL_LIMIT_S = 20  # train.step_timeout_s of the stalled run: the parked rank's watchdog fires then


def test_a_stalled_worker_is_ended_by_its_watchdog_and_the_job_resumes_with_the_uninterrupted_losses(
        tmp_path, synthetic_shards, ray_session, monkeypatch):
    """The same parked rank 1, but nobody kills it: its watchdog ends it (stack report in the MLflow
    run), Ray restarts the group and the job resumes from step 2 as after a kill."""
    from mlflow.tracking import MlflowClient

    from aov_dist.train.driver import main
    from train_harness import compose_cfg, install_worker_setup_hook, run_ranks, typed_cfg

    manifest = synthetic_shards.manifest_path
    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()
    install_worker_setup_hook(monkeypatch, __file__, "park_rank1_of_first_attempt", {KILL_DIR_ENV: str(kill_dir)})
    tracking = ["tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                f"tracking.artifact_location={tmp_path}/art", "tracking.system_metrics=false"]
    t0 = time.monotonic()
    result = main(compose_cfg(_overrides(manifest, tmp_path / "runs")
                              + [f"train.step_timeout_s={STALL_LIMIT_S}", *tracking]), show_progress=False)
    assert (kill_dir / PARKED).exists()  # rank 1 of the first attempt really stalled
    assert result.resumed_from and result.resumed_from.endswith(f"step_{EVERY}"), result.resumed_from
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    names = [a.path for a in client.list_artifacts(result.run_id, "stalls")]
    assert "stalls/rank_1_step_2.txt" in names, names
    report = Path(client.download_artifacts(result.run_id, "stalls/rank_1_step_2.txt")).read_text()
    assert report.startswith("WorkerStalled: rank 1 made no progress") and "while: step 3: forward/backward" in report
    ref = run_ranks(typed_cfg(_overrides(manifest, tmp_path / "ref")), tmp_path / "ref_out")
    assert result.losses == pytest.approx(ref[0]["losses"], rel=1e-5), (result.losses, ref[0]["losses"])
    print(f"stalled run {time.monotonic() - t0:.0f} s")
