"""One evaluation: benchmark -> distributed predictions -> metrics -> MLflow (metrics + tables)."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from aov_dist.eval import judge as judge_mod
from aov_dist.eval.benchmark import COMPLEX, LOW_LEVEL, UNMARKED, load_benchmark
from aov_dist.cluster.config import ClusterConfig
from aov_dist.eval.config import EvalConfig
from aov_dist.eval.metrics import detection_metrics, flatten, mean_or_none, rouge_l, sbert_cosine
from aov_dist.eval.predictor import Backend, anomaly_ov_factory
from aov_dist.eval.runner import run_distributed

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    checkpoint: str
    metrics: dict[str, Any]
    detection_rows: list[dict] = field(default_factory=list)
    reasoning_rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flat_metrics(self, prefix: str = "eval") -> dict[str, float]:
        return flatten(self.metrics, prefix)


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


def evaluate(cfg: EvalConfig, checkpoint: str, cluster: Optional[ClusterConfig] = None,
             backend_factory: Optional[Callable[[], Backend]] = None,
             tracking_uri: Optional[str] = None) -> EvalResult:
    """Evaluate ``checkpoint`` (already resolved, see checkpoints.resolve) on cfg.benchmark.

    ``tracking_uri`` lets workers download runs:/ and models:/ checkpoints.
    """
    cluster = cluster or ClusterConfig()
    bench = load_benchmark(cfg.benchmark,
                           cfg.detection_file if "detection" in cfg.tasks else None,
                           cfg.reasoning_file if "reasoning" in cfg.tasks else None, cfg.limit)
    factory = backend_factory or anomaly_ov_factory(checkpoint, cfg.max_new_tokens, cluster.use_gpu,
                                                    tracking_uri)
    rows = run_distributed(bench, cfg.tasks, cfg.batch_size, cfg.num_workers, factory, cluster,
                           cfg.max_image_side)
    result = EvalResult(checkpoint=checkpoint, metrics={}, detection_rows=rows["detection"],
                        reasoning_rows=rows["reasoning"])
    if rows["detection"]:
        result.metrics["detection"] = score_detection(rows["detection"])
    if rows["reasoning"]:
        result.metrics["reasoning"] = score_reasoning(rows["reasoning"], cfg, result.notes)
    return result  # notes were logged where they arose; the report prints them again


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = list(rows[0]) if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


def log_result(client, run_id: str, result: EvalResult, step: Optional[int] = None) -> None:
    """Metrics (eval/...) and the per-sample tables + full metrics JSON as artifacts of ``run_id``."""
    flat = result.flat_metrics()
    for k, v in sorted(flat.items()):
        client.log_metric(run_id, k, v, step=step or 0)
    if result.detection_rows:
        client.log_table(run_id, _columns(result.detection_rows), "eval/detection_samples.json")
    if result.reasoning_rows:
        client.log_table(run_id, _columns(result.reasoning_rows), "eval/reasoning_samples.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.json"
        path.write_text(json.dumps({"checkpoint": result.checkpoint, "metrics": result.metrics,
                                    "notes": result.notes}, indent=2, default=str))
        client.log_artifact(run_id, str(path), artifact_path="eval")
    client.set_tag(run_id, "aov.eval.checkpoint", result.checkpoint)
