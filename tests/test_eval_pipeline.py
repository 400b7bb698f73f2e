"""Predictions -> metrics -> rows, with a fake model; Ray fan-out equals the in-process path."""
import sys

import numpy as np
import pytest

from aov_dist.eval.config import EvalConfig, validate
from aov_dist.eval.evaluate import evaluate
from aov_dist.eval.predictor import DETECTION_QUESTION
from aov_dist.eval.runner import plan, run_distributed, run_in_process
from aov_dist.eval.benchmark import load_benchmark


class FakeBackend:
    """Deterministic stand-in for the model: the reply depends on the pixels and the history.

    It says "Yes" for bright images and echoes the number of messages it was given, so the test
    can check that each turn's history holds the model's own earlier replies.
    """

    def generate(self, images, conversations):
        out = []
        for img, conv in zip(images, conversations):
            assert conv[-1]["from"] == "human"
            assert conv[0]["value"].startswith("<image>\n")
            mean = float(np.asarray(img, dtype=np.float32).mean()) / 255
            prev = [m["value"] for m in conv if m["from"] == "gpt"]
            out.append(f"{'Yes' if mean > 0.5 else 'No'} m={mean:.4f} h={len(conv)} prev={'|'.join(p[:3] for p in prev)}")
        return out

    def image_scores(self, images):
        return [float(np.asarray(img, dtype=np.float32).std()) / 128 for img in images]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    from aov_dist.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    return generate(SynthConfig(out=str(out), num_train=0, num_bench=12, image_size=32)).benchmark_dir


def test_plan_is_independent_of_workers_and_covers_everything(bench_dir):
    b = load_benchmark(bench_dir)
    p = plan(b, ["detection", "reasoning"], batch_size=5)
    assert [(t, len(items)) for t, items in p] == [("detection", 5), ("detection", 5), ("detection", 2),
                                                  ("reasoning", 5), ("reasoning", 5), ("reasoning", 2)]


def test_evaluate_in_process_rows_and_metrics(bench_dir):
    cfg = EvalConfig(benchmark=bench_dir, num_workers=0, batch_size=4)
    res = evaluate(cfg, "fake-checkpoint", backend_factory=FakeBackend)
    det = res.detection_rows
    assert [r["index"] for r in det] == list(range(12))
    assert all(r["prompt"] == "<image>\n" + DETECTION_QUESTION for r in det)
    assert [r["predicted_anomaly"] for r in det] == [r["reply"].startswith("Yes") for r in det]
    rea = res.reasoning_rows
    # 6 anomalous images with 4 questions, 6 normal ones with 1 (record 0 is normal)
    assert len(rea) == 6 * 4 + 6 and [(r["index"], r["turn"]) for r in rea[:5]] == [(0, 0), (1, 0), (1, 1), (1, 2),
                                                                                     (1, 3)]
    # turn t sees 2t+1 messages, and the earlier gpt messages are the model's own replies
    assert [int(r["reply"].split("h=")[1].split()[0]) for r in rea[1:5]] == [1, 3, 5, 7]
    assert rea[3]["reply"].endswith("prev=" + "|".join(x["reply"][:3] for x in rea[1:3]))
    m = res.metrics
    assert set(m["detection"]) == {"per_class", "class_mean", "overall"}
    assert m["detection"]["overall"]["n"] == 12 and m["detection"]["overall"]["auroc"] is not None
    assert set(m["reasoning"]) == {"low-level", "complex", "all"}
    assert m["reasoning"]["low-level"]["n"] == 18 and m["reasoning"]["complex"]["n"] == 12
    assert 0.0 <= m["reasoning"]["all"]["rouge_l"] <= 1.0 and -1.0 <= m["reasoning"]["all"]["sbert"] <= 1.0
    assert "gpt_score" not in m["reasoning"]["all"] and res.notes and "GPT-Score skipped" in res.notes[0]
    assert all(r["judge_status"] == "skipped" for r in rea)
    assert "eval/detection/class_mean/f1" in res.flat_metrics()


def test_validate_names_the_key():
    with pytest.raises(ValueError, match=r"eval.tasks=\['detect'\]"):
        validate(EvalConfig(tasks=["detect"]))
    with pytest.raises(ValueError, match="eval.batch_size=0"):
        validate(EvalConfig(batch_size=0))
    with pytest.raises(ValueError, match="eval.reasoning_limit=0"):
        validate(EvalConfig(reasoning_limit=0))
    with pytest.raises(ValueError, match="mode='serve'"):
        validate(EvalConfig(), mode="serve")


def test_cli_shorthand():
    from aov_dist.eval.__main__ import rewrite_argv

    assert rewrite_argv(["watch", "checkpoint=runs:/abc/step_4", "judge.model=m", "tracking.uri=x",
                         "+limit=3", "run_id=r"]) == [
        "mode=watch", "eval.checkpoint=runs:/abc/step_4", "eval.judge.model=m", "tracking.uri=x",
        "+eval.limit=3", "run_id=r"]


@pytest.mark.slow
def test_ray_two_workers_equal_one_worker_and_in_process(bench_dir):
    import ray
    from ray import cloudpickle  # Ray's own copy: registering with the PyPI one has no effect

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    b = load_benchmark(bench_dir)
    ref = run_in_process(b, ["detection", "reasoning"], 4, FakeBackend)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        two = run_distributed(b, ["detection", "reasoning"], 4, 2, FakeBackend)
        one = run_distributed(b, ["detection", "reasoning"], 4, 1, FakeBackend)
    finally:
        ray.shutdown()
    assert two == one == ref


class ShiftedBackend(FakeBackend):
    """A second 'checkpoint': the same fake model with other expert scores, so a pool that kept
    the first model would be caught."""

    def image_scores(self, images):
        return [s + 1.0 for s in super().image_scores(images)]


@pytest.mark.slow
def test_worker_pool_is_reused_across_checkpoints_and_equals_a_fresh_pool(bench_dir):
    import ray
    from ray import cloudpickle

    from aov_dist.eval.runner import WorkerPool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    b = load_benchmark(bench_dir)
    tasks = ["detection", "reasoning"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with WorkerPool(2) as pool:
            first = run_distributed(b, tasks, 4, 2, FakeBackend, pool=pool)
            who_first = list(pool.loaded_by)
            second = run_distributed(b, tasks, 4, 2, ShiftedBackend, pool=pool)
            who_second = list(pool.loaded_by)
            # an actor that died is replaced on the next call, which still gives the same rows
            ray.kill(pool.actors[0])
            third = run_distributed(b, tasks, 4, 2, ShiftedBackend, pool=pool)
            who_third = list(pool.loaded_by)
        assert pool.actors == []  # closed by the with block
        fresh_second = run_distributed(b, tasks, 4, 2, ShiftedBackend)
    finally:
        ray.shutdown()
    assert len(who_first) == 2 and len({pid for _, pid in who_first}) == 2
    assert who_second == who_first  # the same actors (ids and processes) loaded the 2nd checkpoint
    assert not set(who_third) & set(who_first)
    assert first == run_in_process(b, tasks, 4, FakeBackend)
    assert second == fresh_second == third == run_in_process(b, tasks, 4, ShiftedBackend)
    assert second["detection"] != first["detection"]  # the new model answered, not the old one


def test_evaluator_without_workers_runs_in_process(bench_dir):
    from aov_dist.eval.evaluate import Evaluator

    cfg = EvalConfig(benchmark=bench_dir, num_workers=0, batch_size=4, plots=False)
    with Evaluator(cfg) as ev:
        assert ev.pool is None
        res = ev("fake-a", backend_factory=FakeBackend)
    assert res.detection_rows == evaluate(cfg, "fake-a", backend_factory=FakeBackend).detection_rows
