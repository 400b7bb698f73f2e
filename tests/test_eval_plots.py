"""Evaluation pictures: the PNGs themselves, the maps' path from backend to overlay, and the
artifacts an evaluation logs to a real MLflow sqlite store (the model is faked)."""
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aov_dist.eval import plots
from aov_dist.eval.benchmark import DetectionItem, load_benchmark
from aov_dist.eval.config import EvalConfig, validate
from aov_dist.eval.evaluate import evaluate, log_result, render_plots, select_map_indices
from aov_dist.eval.predictor import base_view_maps

GRID = 4


def _open(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG"
    return img


def _hot_map(row: int, col: int, grid: int = GRID) -> np.ndarray:
    m = np.zeros((grid, grid), dtype=np.float32)
    m[row, col] = 1.0
    return m


def _cell_centre(row: int, col: int, side: int, grid: int = GRID) -> tuple[int, int]:
    """(x, y) pixel of a cell's centre in a side x side upsampled map."""
    return int((col + 0.5) * side / grid), int((row + 0.5) * side / grid)


# ---------------------------------------------------------------- the pictures on fixed data

def test_roc_png_has_its_fixed_size_and_refuses_one_label():
    png = plots.roc_curve_png([0, 1, 0, 1, 1], [0.1, 0.8, 0.3, 0.2, 0.9])
    assert _open(png).size == (plots.ROC_PX, plots.ROC_PX)
    with pytest.raises(ValueError, match="only one label"):
        plots.roc_curve_png([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="missing: 1"):
        plots.roc_curve_png([0, 1], [0.2, None])


def test_confusion_counts_and_png_size_per_class_grid():
    truth = [0, 0, 0, 1, 1, 1, 1]
    answer = [0, 1, 1, 0, 1, 1, 1]
    assert plots.confusion_counts(truth, answer).tolist() == [[1, 2], [1, 3]]
    classes = ["a", "b", "c", "d", "e", "a", "b"]  # 5 classes + 'all' = 6 panels -> 2 rows x 4 cols
    assert plots.confusion_grid_shape(5) == (2, 4)
    assert _open(plots.confusion_matrix_png(truth, answer, classes)).size == (4 * plots.CM_PANEL_PX,
                                                                             2 * plots.CM_PANEL_PX)
    assert _open(plots.confusion_matrix_png(truth, answer)).size == (plots.CM_PANEL_PX, plots.CM_PANEL_PX)


def test_overlay_colour_follows_the_map():
    grey = Image.new("RGB", (60, 40), (128, 128, 128))  # not square: stretched like the base view
    side = 64
    rgb = plots.overlay_rgb(grey, _hot_map(1, 2), 0.0, 1.0, size=side)
    assert rgb.shape == (side, side, 3) and rgb.dtype == np.uint8
    hx, hy = _cell_centre(1, 2, side)
    cx, cy = _cell_centre(3, 0, side)
    hot, cold = rgb[hy, hx].astype(int), rgb[cy, cx].astype(int)
    assert hot[0] > hot[2] + 50 and cold[2] > cold[0] + 50  # jet: red where hot, blue where cold
    # alpha 0 shows the image alone
    assert (plots.overlay_rgb(grey, _hot_map(1, 2), 0.0, 1.0, size=side, alpha=0.0) == 128).all()


def test_anomaly_grid_png_draws_each_map_in_its_own_panel():
    grey = Image.new("RGB", (48, 48), (128, 128, 128))
    spots = [(0, 0), (3, 3), (1, 2), (2, 1)]
    samples = [plots.MapSample(grey, _hot_map(r, c), f"#{k}") for k, (r, c) in enumerate(spots)]
    img = _open(plots.anomaly_maps_png(samples)).convert("RGB")
    assert img.size == plots.overlay_figure_size(4) and plots.overlay_grid_shape(4) == (2, 3)
    px = np.asarray(img).astype(int)
    for k, (r, c) in enumerate(spots):
        left, top, side = plots.overlay_panel_box(k, len(samples))
        hx, hy = _cell_centre(r, c, side)
        cx, cy = _cell_centre(3 - r, 3 - c, side)  # the opposite corner is cold in every panel
        hot, cold = px[top + hy, left + hx], px[top + cy, left + cx]
        assert hot[0] > hot[2] + 50, (k, hot)
        assert cold[2] > cold[0] + 50, (k, cold)
    with pytest.raises(ValueError, match="no samples"):
        plots.anomaly_maps_png([])


def test_base_view_maps_picks_the_first_view_of_each_image():
    grids = torch.tensor([[0, 0], [1, 2], [2, 1]])  # 1 + 3 + 3 views
    maps = torch.arange(7, dtype=torch.float32)[:, None, None].expand(7, 2, 2).clone()
    picked = base_view_maps(maps, grids)
    assert [float(m[0, 0]) for m in picked] == [0.0, 1.0, 4.0] and picked[0].shape == (2, 2)
    with pytest.raises(ValueError, match="6 maps but image_grids describe 7 views"):
        base_view_maps(maps[:6], grids)


def test_map_selection_is_file_order_anomalous_first():
    items = [DetectionItem(i, f"VisA/c/{i}.png", "c", a) for i, a in enumerate([0, 1, 0, 1, 1, 0, 1, 1, 1])]
    assert select_map_indices(items, 4, 2) == [1, 3, 4, 6, 0, 2]
    assert select_map_indices(items, 0, 1) == [0]
    with pytest.raises(ValueError, match="eval.map_normal=-1"):
        validate(EvalConfig(map_normal=-1))


# ---------------------------------------------------------------- through an evaluation

class MapBackend:
    """Fake model: 'Yes' for bright images; the map is the image's brightness on a GRID x GRID grid."""

    map_calls: list[int] = []

    def generate(self, images, conversations):
        return ["Yes" if np.asarray(img).mean() > 127 else "No" for img in images]

    def image_scores(self, images):
        return [float(np.asarray(img, dtype=np.float32).std()) / 128 for img in images]

    def anomaly_maps(self, images):
        MapBackend.map_calls.append(len(images))
        return [(np.asarray(img.convert("L").resize((GRID, GRID)), dtype=np.float32) / 255).tolist()
                for img in images]


class BrokenMapBackend(MapBackend):
    def anomaly_maps(self, images):
        raise RuntimeError("no maps today")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    from aov_dist.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    return generate(SynthConfig(out=str(out), num_train=0, num_bench=12, image_size=32)).benchmark_dir


def _cfg(bench_dir, **kw):
    return EvalConfig(benchmark=bench_dir, num_workers=0, batch_size=5, tasks=["detection"], **kw)


def test_evaluation_collects_maps_of_the_selected_images_only(bench_dir):
    MapBackend.map_calls.clear()
    res = evaluate(_cfg(bench_dir), "fake", backend_factory=MapBackend)
    items = load_benchmark(bench_dir).detection
    expected = select_map_indices(items, 4, 2)
    assert len(expected) == 6
    assert [int(s.caption.split()[0][1:]) for s in res.map_samples] == expected
    assert sum(MapBackend.map_calls) == 6  # only the selected images, across the 3 batches
    assert all("anomaly_map" not in r for r in res.detection_rows)  # tables stay flat
    first = res.map_samples[0]
    assert first.amap.shape == (GRID, GRID)
    assert ("anomalous" in first.caption) == items[expected[0]].anomaly
    # the map came from that very image (the fake's map is the image's brightness)
    from aov_dist.eval.benchmark import load_image

    img = load_image(bench_dir, items[expected[0]].image)
    np.testing.assert_allclose(first.amap, np.asarray(img.convert("L").resize((GRID, GRID))) / 255, atol=1e-6)

    MapBackend.map_calls.clear()
    off = evaluate(_cfg(bench_dir, plots=False), "fake", backend_factory=MapBackend)
    assert off.map_samples == [] and MapBackend.map_calls == []
    assert off.detection_rows == res.detection_rows


def test_map_failure_is_a_warning_not_a_failed_evaluation(bench_dir, caplog):
    with caplog.at_level(logging.WARNING):
        res = evaluate(_cfg(bench_dir), "fake", backend_factory=BrokenMapBackend)
    assert len(res.detection_rows) == 12 and res.map_samples == []
    assert "no maps today" in caplog.text
    assert sorted(render_plots(res)) == ["confusion_matrix.png", "roc_curve.png"]


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")


def _run(client, tmp_path, name):
    exp = client.create_experiment(name, artifact_location=(tmp_path / "art").as_uri())
    return client.create_run(exp).info.run_id


def test_evaluation_logs_pictures_and_table_to_mlflow(bench_dir, mlflow_client, tmp_path):
    res = evaluate(_cfg(bench_dir), "fake", backend_factory=MapBackend)
    run_id = _run(mlflow_client, tmp_path, "plots-logged")
    log_result(mlflow_client, run_id, res)
    names = {Path(a.path).name for a in mlflow_client.list_artifacts(run_id, "eval")}
    assert {"roc_curve.png", "confusion_matrix.png", "anomaly_maps.png",
            "detection_samples.json", "metrics.json"} <= names
    art = Path(mlflow_client.get_run(run_id).info.artifact_uri.replace("file://", "")) / "eval"
    assert _open((art / "roc_curve.png").read_bytes()).size == (plots.ROC_PX, plots.ROC_PX)
    assert _open((art / "anomaly_maps.png").read_bytes()).size == plots.overlay_figure_size(6)
    table = json.loads((art / "detection_samples.json").read_text())
    assert len(table["data"]) == 12 and "anomaly_map" not in table["columns"]


def test_a_failing_picture_does_not_stop_the_others(bench_dir, mlflow_client, tmp_path, monkeypatch, caplog):
    res = evaluate(_cfg(bench_dir), "fake", backend_factory=MapBackend)

    def boom(*a, **k):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(plots, "roc_curve_png", boom)
    run_id = _run(mlflow_client, tmp_path, "plots-one-fails")
    with caplog.at_level(logging.WARNING):
        log_result(mlflow_client, run_id, res)
    names = {Path(a.path).name for a in mlflow_client.list_artifacts(run_id, "eval")}
    assert "roc_curve.png" not in names and {"confusion_matrix.png", "anomaly_maps.png", "metrics.json"} <= names
    assert "roc_curve.png not drawn: RuntimeError: matplotlib exploded" in caplog.text
    assert mlflow_client.get_run(run_id).data.tags["aov.eval.checkpoint"] == "fake"  # logging went on

    run2 = _run(mlflow_client, tmp_path, "plots-off")
    log_result(mlflow_client, run2, res, pictures=False)
    assert not any(a.path.endswith(".png") for a in mlflow_client.list_artifacts(run2, "eval"))


def test_app_without_tracking_computes_no_maps_and_logs_nothing(bench_dir, tmp_path, monkeypatch, capsys):
    from aov_dist.eval import evaluate as evaluate_mod
    from aov_dist.eval.__main__ import main, rewrite_argv
    from train_harness import compose_cfg

    step = tmp_path / "ckpt" / "step_1"
    (step / "hf").mkdir(parents=True)
    (step / "COMMITTED").write_text("")
    monkeypatch.setattr(evaluate_mod, "anomaly_ov_factory", lambda *a, **k: MapBackend)
    monkeypatch.chdir(tmp_path)
    MapBackend.map_calls.clear()
    overrides = rewrite_argv([f"checkpoint={step}", f"benchmark={bench_dir}", "num_workers=0",
                              "tasks=[detection]", "tracking.enabled=false"])
    cfg = compose_cfg(overrides, config_name="aov_eval_schema")
    metrics = main(cfg)
    assert metrics["detection"]["overall"]["n"] == 12 and "Anomaly-OV-7B (paper)" in capsys.readouterr().out
    assert MapBackend.map_calls == []
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlartifacts").exists()


@pytest.mark.slow
def test_ray_workers_return_the_same_maps_as_in_process(bench_dir):
    import sys

    import ray
    from ray import cloudpickle  # Ray's own copy: registering with the PyPI one has no effect

    from aov_dist.eval.runner import run_distributed, run_in_process

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    b = load_benchmark(bench_dir)
    picked = select_map_indices(b.detection, 4, 2)
    ref = run_in_process(b, ["detection"], 5, MapBackend, map_indices=picked)
    assert sorted(r["index"] for r in ref["detection"] if "anomaly_map" in r) == sorted(picked)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        two = run_distributed(b, ["detection"], 5, 2, MapBackend, map_indices=picked)
    finally:
        ray.shutdown()
    assert two == ref
