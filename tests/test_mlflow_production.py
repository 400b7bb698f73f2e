"""MLflow in the production topology, for real: a tracking server with a PostgreSQL backend store
and S3 artifacts (k8s/rendered/mlflow.yaml's shape), a 2-worker Ray training job writing
checkpoints to S3, the evaluation watcher and the Model Registry, all through that server; the
server is killed in the middle of the job and started again, and no metric is lost."""
from __future__ import annotations

import json
import threading
import time

import boto3
import pytest

from mlflow_server import MlflowServer, postgres_database
from train_harness import compose_cfg, free_port

pytestmark = pytest.mark.slow
STEPS, EVERY = 16, 4


@pytest.fixture
def mlflow_server(s3_server, s3_bucket, tmp_path):
    with postgres_database() as store:
        server = MlflowServer(store, f"{s3_bucket}/mlartifacts", s3_server, tmp_path, free_port())
        server.start()
        try:
            yield server
        finally:
            server.kill()


def _wait_for(what: str, check, timeout_s: float, job: threading.Thread, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        assert job.is_alive(), f"the job ended before {what}"
        time.sleep(poll_s)
    raise AssertionError(f"no {what} within {timeout_s} s")


def _committed(s3, bucket: str, key: str) -> bool:
    return s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0


def test_a_ray_job_and_the_eval_watcher_on_postgres_and_s3_lose_no_metric_across_a_server_restart(
        mlflow_server, s3_bucket, s3_server, synthetic_shards, synthetic_data):
    from mlflow.tracking import MlflowClient

    from aov_dist.eval.config import EvalConfig
    from aov_dist.eval.evaluate import Evaluator
    from aov_dist.eval.watch import Watcher
    from aov_dist.tracking.run_info import manifest_digest
    from aov_dist.config import validate
    from aov_dist.train.driver import init_ray, main

    url, bucket = mlflow_server.url, s3_bucket[len("s3://"):]
    cfg = compose_cfg([
        f"data.datasets=[{{name: synthetic, manifest: '{synthetic_shards.manifest_path}', weight: 1.0}}]",
        "data.num_workers=0", "data.micro_batch_size=2", "stage.global_batch_size=4", f"stage.max_steps={STEPS}",
        f"train.checkpoint_every_steps={EVERY}", "train.keep_checkpoints=4", "cluster.workers_per_node=2",
        f"train.storage_path={s3_bucket}/runs", "train.run_name=prod", f"tracking.uri={url}",
        "tracking.experiment=aov-prod", "tracking.system_metrics=false"])
    # Ray's local processes die with the thread that started them (Linux parent-death signal):
    # start it here, not in the job's thread
    init_ray(validate(cfg))
    done: dict = {}

    def job():
        try:
            done["result"] = main(cfg, show_progress=False)
        except BaseException as e:  # reported by the assertion below
            done["error"] = e

    client = MlflowClient(url)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    run_id = _wait_for("training run", lambda: [r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])], 300, worker)[0]
    _wait_for("second logged loss", lambda: len(client.get_metric_history(run_id, "loss")) >= 2, 300, worker)
    mlflow_server.kill()  # a crash in the middle of the run: training goes on, the tracker buffers
    _wait_for("commit of step 8 while the server is down",
              lambda: _committed(s3, bucket, "runs/prod/step_8/COMMITTED"), 300, worker)
    mlflow_server.start()
    worker.join(600)
    assert not worker.is_alive() and "error" not in done, done.get("error")
    result = done["result"]

    # every step's loss reached the PostgreSQL store, also the steps run while it was down
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(result.losses, rel=1e-6)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny/stage1/prod"
    steps = list(range(EVERY, STEPS + 1, EVERY))
    assert {k: v for k, v in run.data.tags.items() if k.startswith("aov.checkpoint.")} == {
        f"aov.checkpoint.{s}": f"{s3_bucket}/runs/prod/step_{s}" for s in steps}
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == manifest_digest(synthetic_shards.manifest)

    # artifacts went through the server to S3: the config and the registered model
    assert result.registered_model == "models:/aov-tiny-stage1/1"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlartifacts/")["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/config.yaml") for k in keys)
    assert any(k.endswith("model.safetensors") for k in keys), keys

    # the watcher evaluates each checkpoint once, through the same server; then the registered model
    eval_cfg = EvalConfig(benchmark=str(synthetic_data.benchmark_dir), num_workers=1, limit=8, tasks=["detection"])
    with Evaluator(eval_cfg, tracking_uri=url) as evaluator:
        events = Watcher(client, evaluator).scan_once(run_id=run_id)
        assert events == [(run_id, s, "evaluated") for s in steps]
        assert Watcher(client, evaluator).scan_once(run_id=run_id) == [(run_id, s, "done-before") for s in steps]
        registered = evaluator(result.registered_model).flat_metrics()
    acc = "eval/detection/class_mean/accuracy"
    assert [m.step for m in client.get_metric_history(run_id, acc)] == steps
    table = json.loads(open(client.download_artifacts(run_id, "eval/summary.json")).read())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["step"] for r in rows] == steps
    last = rows[-1]
    assert last[acc] == client.get_metric_history(run_id, acc)[-1].value
    # the model in the registry is the last checkpoint: it scores the same
    assert registered[acc] == pytest.approx(last[acc], abs=0)
    assert registered["eval/detection/overall/auroc"] == pytest.approx(last["eval/detection/overall/auroc"], abs=1e-6)
