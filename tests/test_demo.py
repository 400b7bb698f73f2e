"""The demo pipeline at a reduced size, through the same entry point as `make demo`."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_reduced_demo_logs_runs_metrics_artifacts_and_summary(reduced_demo):
    from mlflow.tracking import MlflowClient

    from aov_dist.demo import AUROC, DEFECT_NAMED, DET_ACC, GPT_SCORE, OBJECT_NAMED, ROUGE_L, SBERT, summary_rows

    summary, printed = reduced_demo.summary, reduced_demo.printed
    assert "aov-dist demo: summary" in printed and "make mlflow-ui" in printed
    assert "/runs?workflowType=machine_learning" in printed  # the address of the training runs
    # every phase is scored on detection and reasoning (the gain shows against the untrained row)
    for metrics in (summary.untrained, *summary.stage1.eval.values(), *summary.stage2.eval.values()):
        assert {DET_ACC, AUROC, ROUGE_L, SBERT, GPT_SCORE, OBJECT_NAMED, DEFECT_NAMED} <= set(metrics), sorted(metrics)
    header, rows = summary_rows(summary)
    assert header == ["model", "detection acc", "expert AUROC", "ROUGE-L", "SBERT", "GPT-Score", "object named",
                      "defect named", "place named"]
    last = summary.stage2.eval[max(summary.stage2.eval)]
    assert rows[2][1:4] == [f"{last[DET_ACC]:.3f}", f"{last[AUROC]:.3f}", f"{last[ROUGE_L]:.3f}"]
    assert all(" ".join(row) in " ".join(printed.split()) for row in rows)

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


def test_described_facts_count_what_the_first_answers_state():
    from aov_dist.demo import described_facts

    records = [{"class": "screw", "defect": "scratch", "location": "top"},
               {"class": "bottle", "defect": "hole", "location": "upper left"},
               {"class": "tile", "defect": None, "location": None}]
    rows = [{"index": 0, "turn": 0, "reply": "Yes. There is a thin scratch in the top of the screw."},
            {"index": 0, "turn": 1, "reply": "It is a small round spot."},  # later turns do not count
            {"index": 1, "turn": 0, "reply": "Yes. There is a thin scratch in the upper left of the screw."},
            {"index": 2, "turn": 0, "reply": "Yes. There is a stain in the center of the ceramic tile surface."}]
    assert described_facts(rows, records) == {"answer": 2 / 3, "object": 2 / 3, "defect": 0.5, "place": 1.0}


def test_summary_leaves_gpt_score_out_without_a_judge(capsys):
    from aov_dist.demo import AUROC, DET_ACC, ROUGE_L, DemoSummary, StageSummary, print_summary, summary_rows

    untrained = {DET_ACC: 0.5, AUROC: 0.49, ROUGE_L: 0.01}
    s = DemoSummary(untrained=untrained, stage1=StageSummary("r1", [], [0.7, 0.3], {2: {DET_ACC: 0.5, AUROC: 0.9}}),
                    stage2=StageSummary("r2", [], [6.0, 0.5], {1: {DET_ACC: 0.6}, 4: {DET_ACC: 0.8, ROUGE_L: 0.456}}),
                    out_dir="/nowhere", tracking_uri="sqlite:////nowhere/mlflow.db", seconds=60)
    header, rows = summary_rows(s)
    assert "GPT-Score" not in header
    assert rows == [["untrained (random init)", "0.500", "0.490", "0.010", "-", "-", "-", "-"],
                    ["after stage 1 (expert)", "0.500", "0.900", "-", "-", "-", "-", "-"],
                    ["after stage 2 (LLM)", "0.800", "-", "0.456", "-", "-", "-", "-"]]  # the last checkpoint
    print_summary(s)
    assert "pass --judge-url" in capsys.readouterr().out


def test_sample_answers_are_every_turn_about_one_anomalous_and_one_normal_image(capsys):
    from aov_dist.demo import DemoSummary, StageSummary, print_summary, sample_answers

    def row(index, turn, reference, reply="?"):
        return {"index": index, "turn": turn, "class": "screw", "question": f"q{turn}", "reference": reference,
                "reply": reply}

    rows = [row(0, 0, "No. The screw looks normal."), row(1, 0, "No. fine"), row(2, 0, "Yes. A stain."),
            row(2, 1, "It is an irregular blotch.", "It is a small round spot."), row(3, 0, "Yes. A hole.")]
    picked = sample_answers(rows)
    assert [(r["index"], r["turn"]) for r in picked] == [(0, 0), (2, 0), (2, 1)]
    s = DemoSummary(untrained={}, stage1=StageSummary("r1", [], [1.0]), out_dir="/nowhere", seconds=1,
                    stage2=StageSummary("r2", [], [1.0], {1: {}}, answers=picked), tracking_uri="sqlite:////x.db")
    print_summary(s)
    out = capsys.readouterr().out
    assert "[screw #2] Q: q0" in out and "reference: It is an irregular blotch." in out
    assert "model:     It is a small round spot." in out
