"""The checkpoint watcher against a real MLflow sqlite store (the evaluation itself is faked)."""
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from aov_dist.eval.evaluate import EvalResult
from aov_dist.eval.watch import Watcher, parse_state

F1 = "eval/detection/class_mean/f1"


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    # one sqlite store per module: creating its schema costs seconds; each test gets its own experiment
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")


@pytest.fixture
def store(mlflow_db, tmp_path, request):
    client = mlflow_db
    exp = client.create_experiment(f"aov-test-{request.node.name}", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp, run_name="train")
    return client, run.info.run_id, tmp_path


def _checkpoint(client, run_id, root: Path, step: int, committed: bool = True) -> str:
    d = root / "ckpt" / "train" / f"step_{step}"
    (d / "hf").mkdir(parents=True)
    if committed:
        (d / "COMMITTED").write_text("")
    client.set_tag(run_id, f"aov.checkpoint.{step}", str(d))
    return str(d)


class FakeEval:
    """Records calls; the F1 it reports encodes the step so the logged value can be checked."""

    def __init__(self, fail_for=()):
        self.calls: list[str] = []
        self.fail_for = set(fail_for)

    def __call__(self, uri: str) -> EvalResult:
        self.calls.append(uri)
        step = int(uri.rsplit("_", 1)[1])
        if step in self.fail_for:
            raise RuntimeError(f"model for step {step} would not load")
        rows = [{"index": 0, "image": "x/candle/0.png", "reply": "Yes", "expert_score": 0.5}]
        return EvalResult(checkpoint=uri, detection_rows=rows,
                          metrics={"detection": {"class_mean": {"f1": step / 100, "auroc": None}}})


def _tag(client, run_id, step):
    return client.get_run(run_id).data.tags.get(f"aov.eval.{step}")


def test_evaluates_each_checkpoint_once_at_its_step_and_survives_restart(store):
    client, run_id, root = store
    ck10 = _checkpoint(client, run_id, root, 10)
    fake = FakeEval()
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    events = Watcher(client, fake).scan_once(experiment=experiment)
    assert events == [(run_id, 10, "evaluated")] and fake.calls == [ck10]

    hist = client.get_metric_history(run_id, F1)
    assert [(m.step, m.value) for m in hist] == [(10, 0.10)]
    state = parse_state(_tag(client, run_id, 10))
    assert state.status == "done"
    eval_run = client.get_run(state.eval_run_id)
    assert eval_run.info.status == "FINISHED"
    assert eval_run.data.tags["mlflow.parentRunId"] == run_id
    assert eval_run.data.tags["aov.eval.step"] == "10"
    assert eval_run.data.metrics[F1] == 0.10
    art = Path(eval_run.info.artifact_uri.replace("file://", "")) / "eval"
    assert json.loads((art / "metrics.json").read_text())["checkpoint"] == ck10
    assert (art / "detection_samples.json").exists()

    # same watcher again, then a "restarted" one: nothing is evaluated twice
    assert Watcher(client, fake).scan_once(experiment=experiment) == [(run_id, 10, "done-before")]
    restarted = FakeEval()
    ck20 = _checkpoint(client, run_id, root, 20)
    events = Watcher(client, restarted).scan_once(run_id=run_id)
    assert events == [(run_id, 10, "done-before"), (run_id, 20, "evaluated")]
    assert restarted.calls == [ck20] and fake.calls == [ck10]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, F1)] == [(10, 0.10), (20, 0.20)]
    # the evaluation runs themselves are not mistaken for training runs
    assert [r.info.run_id for r in Watcher(client, fake).training_runs(experiment)] == [run_id]


def test_failures_are_recorded_and_retried_up_to_the_limit(store):
    client, run_id, root = store
    _checkpoint(client, run_id, root, 30)
    fake = FakeEval(fail_for={30})
    w = Watcher(client, fake, max_attempts=2)
    assert w.scan_once(run_id=run_id) == [(run_id, 30, "failed")]
    assert _tag(client, run_id, 30) == "failed:1: RuntimeError: model for step 30 would not load"
    assert w.scan_once(run_id=run_id) == [(run_id, 30, "failed")]
    assert _tag(client, run_id, 30).startswith("failed:2: ")
    assert w.scan_once(run_id=run_id) == [(run_id, 30, "gave-up")]
    assert len(fake.calls) == 2
    assert client.get_metric_history(run_id, F1) == []
    failed_runs = client.search_runs([client.get_run(run_id).info.experiment_id],
                                     filter_string="tags.`aov.eval.step` = '30'")
    assert sorted(r.info.status for r in failed_runs) == ["FAILED", "FAILED"]


def test_uncommitted_checkpoint_is_skipped_without_counting(store):
    client, run_id, root = store
    ck = _checkpoint(client, run_id, root, 40, committed=False)
    fake = FakeEval()
    assert Watcher(client, fake).scan_once(run_id=run_id) == [(run_id, 40, "not-committed")]
    assert fake.calls == [] and _tag(client, run_id, 40) is None
    (Path(ck) / "COMMITTED").write_text("")
    assert Watcher(client, fake).scan_once(run_id=run_id) == [(run_id, 40, "evaluated")]


def test_running_tag_left_by_a_dead_watcher(store):
    client, run_id, root = store
    exp = client.get_run(run_id).info.experiment_id
    _checkpoint(client, run_id, root, 50)
    _checkpoint(client, run_id, root, 60)
    finished = client.create_run(exp, tags={"aov.eval.source_run": run_id})
    client.set_terminated(finished.info.run_id, "FINISHED")
    dangling = client.create_run(exp, tags={"aov.eval.source_run": run_id})
    client.set_tag(run_id, "aov.eval.50", f"running:1:{finished.info.run_id}")  # died after finishing
    client.set_tag(run_id, "aov.eval.60", f"running:1:{dangling.info.run_id}")  # died mid-way
    fake = FakeEval()
    events = Watcher(client, fake, max_attempts=3).scan_once(run_id=run_id)
    assert events == [(run_id, 50, "done-before"), (run_id, 60, "evaluated")]
    assert len(fake.calls) == 1 and fake.calls[0].endswith("step_60")
    assert _tag(client, run_id, 50) == f"done:{finished.info.run_id}"
    assert client.get_run(dangling.info.run_id).info.status == "KILLED"
    assert client.get_run(parse_state(_tag(client, run_id, 60)).eval_run_id).data.tags["aov.eval.attempt"] == "2"


def test_watch_loop_stops_after_idle_polls(store):
    client, run_id, root = store
    _checkpoint(client, run_id, root, 70)
    sleeps = []
    fake = FakeEval()
    Watcher(client, fake).watch(run_id=run_id, poll_s=5, max_idle_polls=2, sleep=sleeps.append)
    assert len(fake.calls) == 1 and sleeps == [5, 5]


def test_parse_state_rejects_garbage():
    assert parse_state(None).status == "new"
    assert parse_state("failed:3: boom: x").message == "boom: x"
    with pytest.raises(ValueError, match="unreadable"):
        parse_state("maybe")


class ReleasingEval(FakeEval):
    """An Evaluator stand-in: records when the watcher lets its workers go."""

    def release(self) -> None:
        self.calls.append("release")


def test_watch_keeps_workers_while_busy_and_releases_them_when_idle(store):
    client, run_id, root = store
    ck10 = _checkpoint(client, run_id, root, 10)
    ev = ReleasingEval()
    polls = []

    def sleep(_s):  # a new checkpoint arrives during the first sleep only
        polls.append(len(polls))
        if len(polls) == 1:
            _checkpoint(client, run_id, root, 20)

    Watcher(client, ev).watch(run_id=run_id, poll_s=1, max_idle_polls=2, sleep=sleep)
    ck20 = str(root / "ckpt" / "train" / "step_20")
    # busy, busy (workers kept: step 20 reuses them), idle -> release, idle -> release and stop
    assert ev.calls == [ck10, ck20, "release", "release"]
    ev2 = ReleasingEval()
    Watcher(client, ev2, release_when_idle=False).watch(run_id=run_id, poll_s=1, max_idle_polls=1,
                                                        sleep=lambda s: None)
    assert ev2.calls == []
