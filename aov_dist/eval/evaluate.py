"""One evaluation: benchmark -> distributed predictions -> metrics -> MLflow (metrics, tables, pictures)."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from aov_dist.eval import judge as judge_mod
from aov_dist.eval import plots
from aov_dist.eval.benchmark import COMPLEX, LOW_LEVEL, UNMARKED, DetectionItem, load_benchmark, load_image
from aov_dist.cluster.config import ClusterConfig
from aov_dist.eval.config import EvalConfig
from aov_dist.eval.metrics import detection_metrics, flatten, mean_or_none, rouge_l, sbert_cosine
from aov_dist.eval.predictor import Backend, anomaly_ov_factory
from aov_dist.eval.runner import WorkerPool, run_distributed

log = logging.getLogger(__name__)
# The headline figures of an evaluation (its run), and one row per evaluated checkpoint (the
# training run's table: the watcher appends to it).
SUMMARY_TABLE = "eval/summary.json"


@dataclass
class EvalResult:
    checkpoint: str
    metrics: dict[str, Any]
    detection_rows: list[dict] = field(default_factory=list)
    reasoning_rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # anomaly-map overlays (driver side only: images + maps of a few detection records)
    map_samples: list[plots.MapSample] = field(default_factory=list)

    def flat_metrics(self, prefix: str = "eval") -> dict[str, float]:
        return flatten(self.metrics, prefix)

    def summary(self) -> dict[str, float]:
        """The headline figures (no per-class breakdown): one row of the summary tables."""
        return {k: v for k, v in self.flat_metrics().items() if "/per_class/" not in k}


def score_detection(rows: list[dict]) -> dict[str, Any]:
    scores = [r.get("expert_score") for r in rows]
    return detection_metrics([r["class"] for r in rows], [r["anomaly"] for r in rows],
                             [r["predicted_anomaly"] for r in rows],
                             scores if all(s is not None for s in scores) else None)


def score_reasoning(rows: list[dict], cfg: EvalConfig, notes: list[str]) -> dict[str, Any]:
    """Adds rouge_l / sbert / gpt_score (+ judge_status) to every row; returns grouped means."""
    replies = [r["reply"] for r in rows]
    refs = [r["reference"] for r in rows]
    for r, v in zip(rows, rouge_l(replies, refs, cfg.rouge_use_stemmer)):
        r["rouge_l"] = v
    for r, v in zip(rows, sbert_cosine(replies, refs, cfg.sbert_model)):
        r["sbert"] = v
    judged = judge_mod.gpt_scores(cfg.judge, [r["question"] for r in rows], refs, replies)
    if judged is None:
        notes.append("GPT-Score skipped: no judge endpoint configured (eval.judge.base_url)")
    for i, r in enumerate(rows):
        r["gpt_score"] = judged[i].score if judged else None
        r["judge_status"] = judged[i].status if judged else "skipped"
    groups: dict[str, Any] = {}
    for kind in (LOW_LEVEL, COMPLEX, UNMARKED, "all"):
        sel = [i for i, r in enumerate(rows) if kind == "all" or r["kind"] == kind]
        if not sel:
            continue
        g: dict[str, Any] = {"n": len(sel),
                             "rouge_l": mean_or_none(rows[i]["rouge_l"] for i in sel),
                             "sbert": mean_or_none(rows[i]["sbert"] for i in sel)}
        if judged is not None:
            g.update(judge_mod.summarize([judged[i] for i in sel]))
        groups[kind] = g
    return groups


def select_map_indices(items: list[DetectionItem], n_anomalous: int, n_normal: int) -> list[int]:
    """Record indices of the first n_anomalous anomalous and first n_normal normal images, in file
    order (anomalous first): the same pictures for every checkpoint, so they can be compared."""
    anomalous = [it.index for it in items if it.anomaly][:n_anomalous]
    normal = [it.index for it in items if not it.anomaly][:n_normal]
    return anomalous + normal


def _map_samples(rows: list[dict], order: list[int], root: str, max_image_side: int) -> list[plots.MapSample]:
    """Pops ``anomaly_map`` out of every row (tables stay flat) and pairs the maps with their images."""
    maps = {r["index"]: r.pop("anomaly_map") for r in rows if "anomaly_map" in r}
    by_index = {r["index"]: r for r in rows}
    out = []
    for i in order:
        if i not in maps:
            continue
        r = by_index[i]
        try:
            image = load_image(root, r["image"], max_image_side)
            image.thumbnail((plots.MAP_PANEL_PX * 2, plots.MAP_PANEL_PX * 2))  # keep the driver light
            score = r.get("expert_score")
            caption = (f"#{i} {r['class']} {'anomalous' if r['anomaly'] else 'normal'}\n"
                       f"expert {'-' if score is None else f'{score:.3f}'}, "
                       f"answer {'Yes' if r['predicted_anomaly'] else 'No'}")
            out.append(plots.MapSample(image=image, amap=np.asarray(maps[i], dtype=np.float32), caption=caption))
        except Exception as e:  # noqa: BLE001 - pictures must never fail an evaluation
            log.warning("overlay: record %d (%s) left out: %s: %s", i, r.get("image"), type(e).__name__, e)
    return out


def evaluate(cfg: EvalConfig, checkpoint: str, cluster: Optional[ClusterConfig] = None,
             backend_factory: Optional[Callable[[], Backend]] = None,
             tracking_uri: Optional[str] = None, with_maps: Optional[bool] = None,
             pool: Optional[WorkerPool] = None) -> EvalResult:
    """Evaluate ``checkpoint`` (already resolved, see checkpoints.resolve) on cfg.benchmark.

    ``tracking_uri`` lets workers download runs:/ and models:/ checkpoints. ``with_maps`` (default
    cfg.plots) asks the workers for the expert maps of the overlay images (select_map_indices).
    ``pool``: live Ray workers to reuse (see ``Evaluator``); without one, workers are started for
    this call only.
    """
    cluster = cluster or ClusterConfig()
    bench = load_benchmark(cfg.benchmark,
                           cfg.detection_file if "detection" in cfg.tasks else None,
                           cfg.reasoning_file if "reasoning" in cfg.tasks else None, cfg.limit,
                           cfg.reasoning_limit)
    factory = backend_factory or anomaly_ov_factory(checkpoint, cfg.max_new_tokens, cluster.use_gpu,
                                                    tracking_uri)
    with_maps = cfg.plots if with_maps is None else with_maps
    map_indices = select_map_indices(bench.detection, cfg.map_anomalous, cfg.map_normal) if with_maps else []
    rows = run_distributed(bench, cfg.tasks, cfg.batch_size, cfg.num_workers, factory, cluster,
                           cfg.max_image_side, map_indices, pool=pool)
    result = EvalResult(checkpoint=checkpoint, metrics={}, detection_rows=rows["detection"],
                        reasoning_rows=rows["reasoning"],
                        map_samples=_map_samples(rows["detection"], map_indices, bench.root, cfg.max_image_side))
    if rows["detection"]:
        result.metrics["detection"] = score_detection(rows["detection"])
    if rows["reasoning"]:
        result.metrics["reasoning"] = score_reasoning(rows["reasoning"], cfg, result.notes)
    return result  # notes were logged where they arose; the report prints them again


class Evaluator:
    """``evaluate`` for checkpoint after checkpoint on one pool of Ray workers (the watcher, the
    demo): the workers start once and load each new checkpoint instead of starting again.

        with Evaluator(cfg, cluster, tracking_uri=uri) as ev:
            Watcher(client, ev).scan_once(run_id=run_id)

    The workers hold their CPUs/GPUs until ``close`` (or ``release``, after which the next call
    starts new ones): release them before training needs the same resources.
    """

    def __init__(self, cfg: EvalConfig, cluster: Optional[ClusterConfig] = None,
                 tracking_uri: Optional[str] = None, with_maps: Optional[bool] = None):
        self.cfg, self.cluster = cfg, cluster or ClusterConfig()
        self.tracking_uri, self.with_maps = tracking_uri, with_maps
        self.pool = WorkerPool(cfg.num_workers, self.cluster) if cfg.num_workers > 0 else None

    def __call__(self, checkpoint: str, backend_factory: Optional[Callable[[], Backend]] = None) -> EvalResult:
        return evaluate(self.cfg, checkpoint, self.cluster, backend_factory, self.tracking_uri, self.with_maps,
                        pool=self.pool)

    def release(self) -> None:
        """Stop the workers now; the next evaluation starts new ones."""
        if self.pool is not None:
            self.pool.close()

    close = release

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = list(rows[0]) if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


def _draw(out: dict[str, bytes], name: str, fn: Callable[..., bytes], *args: Any) -> None:
    try:
        out[name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - a picture never fails an evaluation
        log.warning("%s not drawn: %s: %s", name, type(e).__name__, e)


def render_plots(result: EvalResult) -> dict[str, bytes]:
    """{file name: PNG bytes} of the pictures that can be drawn; each failure is a logged warning."""
    out: dict[str, bytes] = {}
    rows = result.detection_rows
    if rows and all("anomaly" in r and "predicted_anomaly" in r for r in rows):
        truth = [bool(r["anomaly"]) for r in rows]
        _draw(out, "roc_curve.png", plots.roc_curve_png, truth, [r.get("expert_score") for r in rows])
        _draw(out, "confusion_matrix.png", plots.confusion_matrix_png, truth,
              [bool(r["predicted_anomaly"]) for r in rows], [str(r.get("class", "?")) for r in rows])
    if result.map_samples:
        _draw(out, "anomaly_maps.png", plots.anomaly_maps_png, result.map_samples)
    return out


def log_plots(client, run_id: str, result: EvalResult, artifact_path: str = "eval") -> list[str]:
    """Pictures as artifacts of ``run_id``; returns the names logged. Never raises."""
    try:
        pictures = render_plots(result)
        with tempfile.TemporaryDirectory() as tmp:
            for name, png in pictures.items():
                path = Path(tmp) / name
                path.write_bytes(png)
                client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        return sorted(pictures)
    except Exception as e:  # noqa: BLE001
        log.warning("evaluation pictures not logged to run %s: %s: %s", run_id, type(e).__name__, e)
        return []


def log_result(client, run_id: str, result: EvalResult, step: Optional[int] = None,
               pictures: bool = True) -> None:
    """Metrics (eval/...), the per-sample tables, the full metrics JSON and (``pictures``) the
    plots (roc_curve.png, confusion_matrix.png, anomaly_maps.png) as artifacts of ``run_id``."""
    flat = result.flat_metrics()
    for k, v in sorted(flat.items()):
        client.log_metric(run_id, k, v, step=step or 0)
    summary = result.summary()
    client.log_table(run_id, {"metric": list(summary), "value": list(summary.values())}, SUMMARY_TABLE)
    if result.detection_rows:
        client.log_table(run_id, _columns(result.detection_rows), "eval/detection_samples.json")
    if result.reasoning_rows:
        client.log_table(run_id, _columns(result.reasoning_rows), "eval/reasoning_samples.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.json"
        path.write_text(json.dumps({"checkpoint": result.checkpoint, "metrics": result.metrics,
                                    "notes": result.notes}, indent=2, default=str))
        client.log_artifact(run_id, str(path), artifact_path="eval")
    if pictures:
        log_plots(client, run_id, result)
    client.set_tag(run_id, "aov.eval.checkpoint", result.checkpoint)
