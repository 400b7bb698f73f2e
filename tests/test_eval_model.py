"""The evaluation on the real (tiny, random-init) Anomaly-OV: Ray fan-out and the aov-eval app."""
import json
from pathlib import Path

import pytest

from aov_dist.eval.config import EvalConfig


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A committed step folder as training writes it: step_3/hf/ (model + processor), COMMITTED."""
    from aov_dist.model import ModelConfig, build_model

    step = tmp_path_factory.mktemp("ckpt") / "run" / "step_3"
    model, processor = build_model(ModelConfig())
    model.save_pretrained(step / "hf")
    processor.save_pretrained(step / "hf")
    (step / "COMMITTED").write_text("")
    return str(step)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> str:
    """A second committed step folder: the tiny model with every weight perturbed."""
    import torch

    from aov_dist.model import ModelConfig, build_model

    step = tmp_path_factory.mktemp("ckpt2") / "run" / "step_6"
    model, processor = build_model(ModelConfig())  # (its init is seeded: perturb it ourselves)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.save_pretrained(step / "hf")
    processor.save_pretrained(step / "hf")
    (step / "COMMITTED").write_text("")
    return str(step)


def _cfg(bench, **kw) -> EvalConfig:
    return EvalConfig(benchmark=str(bench), limit=6, batch_size=2, max_new_tokens=6, **kw)


@pytest.mark.slow
def test_two_workers_equal_one_worker_on_the_tiny_model(tiny_checkpoint, synthetic_data):
    import ray

    from aov_dist.eval.evaluate import evaluate

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        two = evaluate(_cfg(synthetic_data.benchmark_dir, num_workers=2), tiny_checkpoint)
        one = evaluate(_cfg(synthetic_data.benchmark_dir, num_workers=1), tiny_checkpoint)
    finally:
        ray.shutdown()
    assert len(two.detection_rows) == 6 and len(two.reasoning_rows) > 6
    assert two.detection_rows == one.detection_rows
    assert two.reasoning_rows == one.reasoning_rows
    assert two.metrics == one.metrics
    assert all(0.0 <= r["expert_score"] <= 1.0 for r in two.detection_rows)
    # multi-turn: later turns were generated (the history grew with the model's own replies)
    assert max(r["turn"] for r in two.reasoning_rows) == 3


@pytest.mark.slow
def test_evaluator_loads_the_next_checkpoint_into_the_same_workers(tiny_checkpoint, other_checkpoint,
                                                                    synthetic_data):
    import dataclasses

    import ray

    from aov_dist.eval.evaluate import Evaluator, evaluate

    cfg = _cfg(synthetic_data.benchmark_dir, num_workers=2, tasks=["detection"], plots=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with Evaluator(cfg) as ev:
            first = ev(tiny_checkpoint)
            who_first = list(ev.pool.loaded_by)
            second = ev(other_checkpoint)
            who_second = list(ev.pool.loaded_by)
        fresh = evaluate(dataclasses.replace(cfg, num_workers=1), other_checkpoint)
    finally:
        ray.shutdown()
    assert len(who_first) == 2 and who_second == who_first  # same actor ids and processes
    assert second.detection_rows == fresh.detection_rows and second.metrics == fresh.metrics
    assert [r["expert_score"] for r in second.detection_rows] != [r["expert_score"] for r in first.detection_rows]


@pytest.mark.slow
def test_aov_eval_app_logs_to_mlflow(tiny_checkpoint, synthetic_data, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from aov_dist.eval.__main__ import main, rewrite_argv
    from train_harness import compose_cfg

    db = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = rewrite_argv([f"checkpoint={tiny_checkpoint}", f"benchmark={synthetic_data.benchmark_dir}",
                              "num_workers=0", "limit=4", "batch_size=2", "max_new_tokens=4",
                              f"tracking.uri={db}", f"tracking.artifact_location={tmp_path}/art"])
    cfg = compose_cfg(overrides, config_name="aov_eval_schema")
    metrics = main(cfg)
    out = capsys.readouterr().out
    assert "Anomaly-OV-7B (paper)" in out and "GPT-Score skipped" in out

    client = MlflowClient(tracking_uri=db)
    run = client.search_runs([client.get_experiment_by_name("aov-dist").experiment_id])[0]
    assert run.data.params["checkpoint"] == tiny_checkpoint
    assert run.data.metrics["eval/detection/class_mean/f1"] == metrics["detection"]["class_mean"]["f1"]
    art = Path(run.info.artifact_uri.replace("file://", "")) / "eval"
    table = json.loads((art / "detection_samples.json").read_text())
    assert "reply" in table["columns"] and len(table["data"]) == 4
    # pictures from the real model: the overlays hold the anomalous and normal images of the 4
    pngs = {p.name for p in art.glob("*.png")}
    assert pngs >= {"confusion_matrix.png", "anomaly_maps.png"}, pngs
    labels = [row[table["columns"].index("anomaly")] for row in table["data"]]
    assert ("roc_curve.png" in pngs) == (len(set(labels)) == 2)


@pytest.mark.slow
def test_backend_anomaly_maps_are_the_base_view_maps(tiny_checkpoint):
    """The overlay's map of an image is its base view's map, whatever its crops and batch mates."""
    import numpy as np
    import torch
    from PIL import Image

    from aov_dist.eval.checkpoints import materialize
    from aov_dist.eval.predictor import AnomalyOVBackend

    backend = AnomalyOVBackend(materialize(tiny_checkpoint), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 128), (40, 40)]]
    maps = backend.anomaly_maps(images)
    grid = backend.model.expert.dims.grid
    assert len(maps) == 2 and all(np.asarray(m).shape == (grid, grid) for m in maps)
    for img, got in zip(images, maps):
        enc = backend.processor.encode_images([img])
        with torch.inference_mode():
            alone = backend.model.expert_forward(enc.pixel_values, enc.image_grids).maps[0]
        np.testing.assert_allclose(np.asarray(got), alone.numpy(), atol=1e-5)
    assert not np.allclose(maps[0], maps[1])
