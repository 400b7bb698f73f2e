"""The demo pipeline at a reduced size, through the same entry point as `make demo`."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_reduced_demo_logs_runs_metrics_artifacts_and_summary(reduced_demo):
    from mlflow.tracking import MlflowClient

    from aov_dist.demo import AUROC, DET_ACC

    summary, printed = reduced_demo.summary, reduced_demo.printed
    assert "aov-dist demo: summary" in printed and "make mlflow-ui" in printed
    assert "/runs?workflowType=machine_learning" in printed  # the address of the training runs
    assert DET_ACC in summary.untrained and AUROC in summary.untrained

    # conf/demo.yaml eval_tasks: reasoning only where the LLM has been trained (stage 2)
    assert not any(k.startswith("eval/reasoning") for e in summary.stage1.eval.values() for k in e)
    assert all(any(k.startswith("eval/reasoning") for k in e) for e in summary.stage2.eval.values())

    client = MlflowClient(tracking_uri=summary.tracking_uri)
    for stage in (summary.stage1, summary.stage2):
        run = client.get_run(stage.run_id)
        assert run.info.status == "FINISHED"
        losses = client.get_metric_history(stage.run_id, "loss")
        assert [m.step for m in losses] == list(range(1, len(stage.losses) + 1))
        # every committed checkpoint was evaluated once, and its scores sit at its step
        ckpt_steps = sorted(int(k.rsplit(".", 1)[1]) for k in run.data.tags if k.startswith("aov.checkpoint."))
        assert ckpt_steps and sorted(stage.eval) == ckpt_steps
        acc_steps = sorted(m.step for m in client.get_metric_history(stage.run_id, DET_ACC))
        assert acc_steps == ckpt_steps
        assert all(run.data.tags[f"aov.eval.{s}"].startswith("done:") for s in ckpt_steps)
        # the evaluation runs carry the pictures and the per-sample table
        eval_run_id = run.data.tags[f"aov.eval.{ckpt_steps[-1]}"].split(":", 1)[1]
        names = {a.path for a in client.list_artifacts(eval_run_id, "eval")}
        for expected in ("eval/roc_curve.png", "eval/confusion_matrix.png", "eval/anomaly_maps.png",
                         "eval/detection_samples.json"):
            assert expected in names, names


def test_demo_reuses_data_only_when_generated_with_its_settings(tmp_path):
    """make demo after make shards (or after editing conf/demo.yaml) must not train on other data."""
    from aov_dist.data.synth import SynthConfig, generate
    from aov_dist.demo import _same_synth

    spec = {"num_train": 6, "num_bench": 0, "image_size": 40, "seed": 0}
    generate(SynthConfig(out=str(tmp_path), **spec))
    meta = str(tmp_path / "meta.json")
    assert _same_synth(meta, spec)
    assert not _same_synth(meta, {**spec, "seed": 1})
    assert not _same_synth(meta, {**spec, "shape_weights": [1.0, 0.0, 0.0]})
    assert not _same_synth(str(tmp_path / "missing.json"), spec)
