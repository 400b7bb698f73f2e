"""`make demo` / `python -m aov_dist.demo`: the whole pipeline in miniature, with the real engines.

synthetic Anomaly-Instruct-format data -> WebDataset shards -> stage 1 (expert) and stage 2
(projector + LLM) on a local Ray cluster with DeepSpeed ZeRO-3 on CPU -> VisA-D&R-format evaluation
of every checkpoint on Ray workers, logged into the training runs at the checkpoint steps -> summary.
The settings live in conf/demo.yaml (`full` for make demo, `reduced` for the test).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from aov_dist.config import CONF_DIR, register_configs

log = logging.getLogger("aov_dist.demo")


@dataclass
class StageSummary:
    run_id: Optional[str]
    checkpoints: list[str]
    losses: list[float]
    eval: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> flat eval metrics


@dataclass
class DemoSummary:
    untrained: dict[str, Any]
    stage1: StageSummary
    stage2: StageSummary
    out_dir: str
    tracking_uri: str
    seconds: float


def _say(msg: str) -> None:
    print(msg, flush=True)


def ensure_data(data_dir: str, synth: dict[str, Any]) -> str:
    """Synthetic data + shards, reused when the manifest is already there."""
    from aov_dist.data.shards import write_shards
    from aov_dist.data.synth import SynthConfig, generate

    manifest = os.path.join(data_dir, "shards", "manifest.json")
    meta = os.path.join(data_dir, "meta.json")
    if os.path.exists(manifest) and _same_synth(meta, synth):
        _say(f"[1/5] data: reusing {manifest}")
        return manifest
    if os.path.exists(manifest):
        _say(f"[1/5] data: {meta} was generated with other settings than conf/demo.yaml: regenerating")
    _say(f"[1/5] data: generating synthetic Anomaly-Instruct + VisA-D&R-format data in {data_dir}")
    generate(SynthConfig(out=data_dir, **synth))
    write_shards([os.path.join(data_dir, "train", "synthetic_instruct.json")], os.path.join(data_dir, "shards"),
                 image_root=os.path.join(data_dir, "train", "images"), shard_size_mb=2, on_error="fail",
                 overwrite=True)
    return manifest


def _same_synth(meta_path: str, synth: dict[str, Any]) -> bool:
    """Whether the data in a folder was generated with the demo's settings (meta.json records them)."""
    import json

    from aov_dist.data.synth import SynthConfig

    if not os.path.exists(meta_path):
        return False
    with open(meta_path) as f:
        meta = json.load(f)
    wanted = dataclasses.asdict(SynthConfig(out="", **synth))
    return all(_plain(meta.get(k)) == _plain(v) for k, v in wanted.items() if k not in ("out", "classes"))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _eval_cfg(benchmark: str, limit: Optional[int], workers: int, tasks: list[str]):
    from aov_dist.eval.config import EvalConfig

    return EvalConfig(benchmark=benchmark, num_workers=workers, limit=limit, tasks=list(tasks))


def untrained_baseline(common: list[str], out_dir: str, eval_cfg) -> dict[str, Any]:
    """The random-init tiny model, evaluated the same way (what 'learning' is measured against)."""
    from aov_dist.eval.evaluate import evaluate
    from aov_dist.model import build_model
    from aov_dist.config import validate

    c = validate(_compose(common))
    path = os.path.join(out_dir, "untrained", "hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        model, processor = build_model(c.model)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return evaluate(eval_cfg, path, c.cluster).flat_metrics()


def train_stage(overrides: list[str]):
    from aov_dist.train.driver import main

    return main(_compose(overrides))


def evaluate_run(run_id: str, tracking_uri: str, eval_cfg, cluster, pool=None) -> dict[int, dict[str, Any]]:
    """The evaluation watcher's scan over one training run: each committed checkpoint once, its
    metrics logged into the training run at the checkpoint's step."""
    from mlflow.tracking import MlflowClient

    from aov_dist.eval.evaluate import evaluate
    from aov_dist.eval.watch import Watcher

    client = MlflowClient(tracking_uri=tracking_uri)
    scores: dict[int, dict[str, Any]] = {}

    def evaluate_fn(uri: str):
        result = evaluate(eval_cfg, uri, cluster, tracking_uri=tracking_uri, pool=pool)
        scores[int(uri.rstrip("/").rsplit("_", 1)[-1])] = result.flat_metrics()
        return result

    Watcher(client, evaluate_fn).scan_once(run_id=run_id)
    return scores


def run_demo(size: str = "full", out_dir: str = "demo_out", data_dir: str = "data_shards/synthetic",
             tracking_uri: Optional[str] = None, eval_workers: int = 2) -> DemoSummary:
    t0 = time.time()
    spec = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, "demo.yaml")))[size]
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tracking_uri = tracking_uri or f"sqlite:///{os.path.join(out_dir, 'mlflow.db')}"
    manifest = ensure_data(data_dir, spec["synth"])
    benchmark = os.path.join(data_dir, "benchmark")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"data.datasets=[{{name: synthetic, manifest: {os.path.abspath(manifest)}, weight: 1.0}}]",
              f"train.storage_path={os.path.join(out_dir, 'runs')}", f"tracking.uri={tracking_uri}",
              f"tracking.artifact_location={os.path.join(out_dir, 'mlartifacts')}", "tracking.experiment=aov-demo",
              *spec.get("common", [])]
    # the untrained model and stage-1 checkpoints (LLM not trained yet) are scored on detection only
    tasks = spec["eval_tasks"]
    eval_cfgs = {phase: _eval_cfg(benchmark, spec["eval_limit"], eval_workers, tasks[phase])
                 for phase in ("untrained", "stage1", "stage2")}
    from aov_dist.config import validate
    from aov_dist.train.driver import init_ray

    job = validate(_compose(common))
    cluster = job.cluster
    init_ray(job)  # one quiet local Ray instance for training and evaluation workers alike

    _say("[2/5] untrained model on the benchmark (the baseline)")
    untrained = untrained_baseline(common, out_dir, eval_cfgs["untrained"])
    _say("[3/5] stage 1: the anomaly expert (Ray Train, 2 workers, DeepSpeed ZeRO-3)")
    s1 = train_stage(common + ["stage=stage1", f"train.run_name=demo-{stamp}-stage1"] + spec["stage1"])
    _say("[4/5] stage 2: projector + LLM, starting from stage 1")
    s2 = train_stage(common + ["stage=stage2", f"train.run_name=demo-{stamp}-stage2",
                               f"stage.init_from={s1.latest_checkpoint}"] + spec["stage2"])
    _say("[5/5] evaluation of every checkpoint on Ray workers (logged at the checkpoint steps)")
    from aov_dist.eval.runner import WorkerPool

    # one pool of eval workers loads checkpoint after checkpoint (training is over: its CPUs are free)
    with WorkerPool(eval_workers, cluster) as pool:
        evals1 = evaluate_run(s1.run_id, tracking_uri, eval_cfgs["stage1"], cluster, pool)
        evals2 = evaluate_run(s2.run_id, tracking_uri, eval_cfgs["stage2"], cluster, pool)
    summary = DemoSummary(
        untrained=untrained,
        stage1=StageSummary(s1.run_id, s1.checkpoints, s1.losses, evals1),
        stage2=StageSummary(s2.run_id, s2.checkpoints, s2.losses, evals2),
        out_dir=out_dir, tracking_uri=tracking_uri, seconds=time.time() - t0)
    print_summary(summary)
    return summary


def _last(evals: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return evals[max(evals)] if evals else {}


DET_ACC = "eval/detection/class_mean/accuracy"
AUROC = "eval/detection/overall/auroc"  # image-level, over the whole benchmark


def print_summary(s: DemoSummary) -> None:
    s1, s2 = _last(s.stage1.eval), _last(s.stage2.eval)

    from aov_dist.eval.report import text_table

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    rows = [[name, f(m.get(DET_ACC)), f(m.get(AUROC))] for name, m in
            (("untrained (random init)", s.untrained), ("after stage 1 (expert)", s1), ("after stage 2 (LLM)", s2))]
    _say("\n" + text_table("aov-dist demo: summary", ["model", "detection acc", "expert AUROC"], rows))
    _say("(detection accuracy: per-class mean, the paper's protocol; chance is 0.5)")
    _say(f"stage 1 loss {s.stage1.losses[0]:.3f} -> {s.stage1.losses[-1]:.3f}; "
         f"stage 2 loss {s.stage2.losses[0]:.3f} -> {s.stage2.losses[-1]:.3f}")
    _say(f"MLflow runs: stage 1 {s.stage1.run_id}, stage 2 {s.stage2.run_id} in {s.tracking_uri}")
    _say(f"checkpoints: {os.path.join(s.out_dir, 'runs')}")
    _say(f"worker logs (Ray, DeepSpeed): /tmp/ray/session_latest/logs")
    _say(f"open the MLflow UI: make mlflow-ui   (then {_runs_url(s)})")
    _say(f"total {s.seconds / 60:.1f} min")


def _runs_url(s: DemoSummary) -> str:
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.run_info import training_runs_url

    base = "http://127.0.0.1:5000"
    try:
        return training_runs_url(base, MlflowClient(s.tracking_uri).get_run(s.stage1.run_id).info.experiment_id)
    except Exception:  # untracked demo
        return base


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["full", "reduced"], default="full")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--data", default="data_shards/synthetic")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    # library chatter (weight-loading bars, advisory warnings) stays out of the demo's output;
    # set before Ray starts so every worker inherits it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # DeepSpeed warns on import when it has to guess the accelerator: say it. The demo runs the
    # local CPU preset everywhere, also on a machine with GPUs (the driver checks they agree).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import mlflow  # noqa: F401 - configures its loggers on import: quiet them after that

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # table creation, model registration notes
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
    run_demo(args.size, args.out, args.data, args.tracking_uri)


if __name__ == "__main__":
    main()
