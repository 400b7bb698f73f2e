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
    # the last checkpoint's reasoning answers about two held-out images (sample_answers)
    answers: list[dict[str, Any]] = field(default_factory=list)


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


def _phase(t0: float, msg: str) -> None:
    _say(f"{msg}   (at {(time.time() - t0) / 60:.1f} min)")


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


def _eval_cfg(benchmark: str, limit: Optional[int], reasoning_limit: Optional[int], workers: int,
              tasks: list[str], judge=None):
    from aov_dist.eval.config import EvalConfig, JudgeConfig

    return EvalConfig(benchmark=benchmark, num_workers=workers, limit=limit, reasoning_limit=reasoning_limit,
                      tasks=list(tasks), judge=judge or JudgeConfig())


def described_facts(rows: list[dict], records: list[dict]) -> dict[str, float]:
    """How often the first answer about an image states its ground truth (synth_text's templates):
    the Yes/No it leads with and the object, over every image; the defect kind and its place in
    the object, over the anomalous ones. ROUGE-L rewards the template; these say what was read."""
    from aov_dist.data.synth_text import read_description

    hits: dict[str, list[bool]] = {"answer": [], "object": [], "defect": [], "place": []}
    for row in rows:
        if row["turn"] != 0:
            continue
        truth, said = records[row["index"]], read_description(row["reply"])
        hits["answer"].append(said["anomalous"] == ("yes" if truth["defect"] else "no"))
        hits["object"].append(said["cls"] == truth["class"])
        if truth["defect"]:
            hits["defect"].append(said["defect"] == truth["defect"])
            hits["place"].append(said["location"] == truth["location"])
    return {k: sum(v) / len(v) for k, v in hits.items() if v}


def evaluate_with_facts(eval_cfg, checkpoint: str, cluster, **kw):
    """``evaluate`` plus the metrics group ``facts`` (described_facts) when reasoning was scored;
    the watcher logs them with the rest (eval/facts/...)."""
    from aov_dist.eval.benchmark import join, load_records
    from aov_dist.eval.evaluate import evaluate

    result = evaluate(eval_cfg, checkpoint, cluster, **kw)
    if result.reasoning_rows:
        records = load_records(join(eval_cfg.benchmark, eval_cfg.reasoning_file))
        result.metrics["facts"] = described_facts(result.reasoning_rows, records)
    return result


def untrained_baseline(common: list[str], out_dir: str, eval_cfg) -> dict[str, Any]:
    """The random-init tiny model, evaluated the same way (what 'learning' is measured against)."""
    from aov_dist.model import build_model
    from aov_dist.config import validate

    c = validate(_compose(common))
    path = os.path.join(out_dir, "untrained", "hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        model, processor = build_model(c.model)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return evaluate_with_facts(eval_cfg, path, c.cluster).flat_metrics()


def train_stage(overrides: list[str]):
    from aov_dist.train.driver import main

    return main(_compose(overrides))


def sample_answers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every turn about the first image whose reference names a defect and about the first normal one."""
    first = {}
    for r in rows:
        if r["turn"] == 0:
            first.setdefault(r["reference"].startswith("Yes"), r["index"])
    return [r for r in rows if r["index"] in first.values()]


def evaluate_run(run_id: str, tracking_uri: str, eval_cfg, cluster, pool=None
                 ) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The evaluation watcher's scan over one training run: each committed checkpoint once, its
    metrics logged into the training run at the checkpoint's step. Returns the metrics by step
    and the last checkpoint's sample answers."""
    from mlflow.tracking import MlflowClient

    from aov_dist.eval.watch import Watcher

    client = MlflowClient(tracking_uri=tracking_uri)
    scores: dict[int, dict[str, Any]] = {}
    answers: dict[int, list[dict[str, Any]]] = {}

    def evaluate_fn(uri: str):
        result = evaluate_with_facts(eval_cfg, uri, cluster, tracking_uri=tracking_uri, pool=pool)
        step = int(uri.rstrip("/").rsplit("_", 1)[-1])
        scores[step], answers[step] = result.flat_metrics(), sample_answers(result.reasoning_rows)
        return result

    Watcher(client, evaluate_fn).scan_once(run_id=run_id)
    return scores, answers[max(answers)] if answers else []


def run_demo(size: str = "full", out_dir: str = "demo_out", data_dir: str = "data_shards/synthetic",
             tracking_uri: Optional[str] = None, eval_workers: int = 2, judge=None,
             seed: Optional[int] = None) -> DemoSummary:
    """``judge``: an eval JudgeConfig for GPT-Score (None: no judge, GPT-Score is left out).
    ``seed``: every seed of the run (synthetic data, model init, data order, training) instead of
    conf/demo.yaml's; the way to check that the figures do not hang on one lucky draw."""
    t0 = time.time()
    spec = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, "demo.yaml")))[size]
    if seed is not None:
        spec["synth"]["seed"] = seed
        spec["common"] = [*spec.get("common", []), f"train.seed={seed}", f"data.seed={seed}",
                          f"model.init_seed={seed}"]
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
    tasks = spec["eval_tasks"]
    eval_cfgs = {phase: _eval_cfg(benchmark, spec["eval_limit"], spec["reasoning_limit"][phase], eval_workers,
                                  tasks[phase], judge)
                 for phase in ("untrained", "stage1", "stage2")}
    from aov_dist.config import validate
    from aov_dist.train.driver import init_ray

    job = validate(_compose(common))
    cluster = job.cluster
    init_ray(job)  # one quiet local Ray instance for training and evaluation workers alike

    _phase(t0, "[2/5] untrained model on the benchmark (the baseline)")
    untrained = untrained_baseline(common, out_dir, eval_cfgs["untrained"])
    _phase(t0, "[3/5] stage 1: the anomaly expert (Ray Train, 2 workers, DeepSpeed ZeRO-3)")
    s1 = train_stage(common + ["stage=stage1", f"train.run_name=demo-{stamp}-stage1"] + spec["stage1"])
    _phase(t0, "[4/5] stage 2: projector + LLM, starting from stage 1")
    s2 = train_stage(common + ["stage=stage2", f"train.run_name=demo-{stamp}-stage2",
                               f"stage.init_from={s1.latest_checkpoint}"] + spec["stage2"])
    _phase(t0, "[5/5] evaluation of every checkpoint on Ray workers (logged at the checkpoint steps)")
    from aov_dist.eval.runner import WorkerPool

    # one pool of eval workers loads checkpoint after checkpoint (training is over: its CPUs are free)
    with WorkerPool(eval_workers, cluster) as pool:
        evals1 = evaluate_run(s1.run_id, tracking_uri, eval_cfgs["stage1"], cluster, pool)
        evals2 = evaluate_run(s2.run_id, tracking_uri, eval_cfgs["stage2"], cluster, pool)
    summary = DemoSummary(
        untrained=untrained,
        stage1=StageSummary(s1.run_id, s1.checkpoints, s1.losses, *evals1),
        stage2=StageSummary(s2.run_id, s2.checkpoints, s2.losses, *evals2),
        out_dir=out_dir, tracking_uri=tracking_uri, seconds=time.time() - t0)
    print_summary(summary)
    return summary


def _last(evals: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return evals[max(evals)] if evals else {}


DET_ACC = "eval/detection/class_mean/accuracy"
AUROC = "eval/detection/overall/auroc"  # image-level, over the whole benchmark
ROUGE_L = "eval/reasoning/all/rouge_l"
SBERT = "eval/reasoning/all/sbert"
GPT_SCORE = "eval/reasoning/all/gpt_score"
OBJECT_NAMED = "eval/facts/object"
DEFECT_NAMED = "eval/facts/defect"
PLACE_NAMED = "eval/facts/place"
# (column, metric, digits) of the summary table; GPT-Score only when a judge scored the answers
SUMMARY_COLUMNS = (("detection acc", DET_ACC, 3), ("expert AUROC", AUROC, 3), ("ROUGE-L", ROUGE_L, 3),
                   ("SBERT", SBERT, 3), ("GPT-Score", GPT_SCORE, 2), ("object named", OBJECT_NAMED, 2),
                   ("defect named", DEFECT_NAMED, 2), ("place named", PLACE_NAMED, 2))


def summary_rows(s: DemoSummary) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows: untrained, after stage 1, after stage 2 (last checkpoints)."""
    phases = (("untrained (random init)", s.untrained), ("after stage 1 (expert)", _last(s.stage1.eval)),
              ("after stage 2 (LLM)", _last(s.stage2.eval)))
    cols = [c for c in SUMMARY_COLUMNS if c[1] != GPT_SCORE or any(GPT_SCORE in m for _, m in phases)]

    def f(v: Optional[float], digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    return ["model", *(c[0] for c in cols)], [[name, *(f(m.get(key), d) for _, key, d in cols)]
                                               for name, m in phases]


def print_summary(s: DemoSummary) -> None:
    from aov_dist.eval.report import text_table

    header, rows = summary_rows(s)
    _say("\n" + text_table("aov-dist demo: summary", header, rows, width=140))
    _say("(detection accuracy: per-class mean, the paper's protocol; chance is 0.5. Reasoning, over the "
         "held-out images: ROUGE-L and SBERT against the reference answers; object / defect / place named: how "
         "often the first answer names the right object (chance 1/6), defect kind (chance 1/6) and its cell of "
         "a 3x3 grid over the object (chance 1/9))")
    if "GPT-Score" not in header:
        _say("(GPT-Score: no judge configured; pass --judge-url to score the answers with an LLM judge)")
    if s.stage2.answers:
        _say("\nthe stage-2 model's answers about two held-out images (its own earlier answers form the history):")
        for r in s.stage2.answers:
            head = f"  [{r['class']} #{r['index']}] " if r["turn"] == 0 else "    "
            _say(f"{head}Q: {r['question']}\n      reference: {r['reference']}\n      model:     {r['reply']}")
    _say(f"stage 1 loss {s.stage1.losses[0]:.3f} -> {s.stage1.losses[-1]:.3f}; "
         f"stage 2 loss {s.stage2.losses[0]:.3f} -> {s.stage2.losses[-1]:.3f}")
    _say(f"MLflow runs: stage 1 {s.stage1.run_id}, stage 2 {s.stage2.run_id} in {s.tracking_uri}")
    _say(f"checkpoints: {os.path.join(s.out_dir, 'runs')}")
    _say("worker logs (Ray, DeepSpeed): /tmp/ray/session_latest/logs")
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
    p.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible endpoint (.../v1) of an LLM judge for GPT-Score; its API key is read "
                        "from $AOV_JUDGE_API_KEY")
    p.add_argument("--judge-model", default=None, help="the judge's model (default: eval.judge.model)")
    p.add_argument("--seed", type=int, default=None,
                   help="every seed of the run (data, init, order, training); use another --data folder")
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
    from aov_dist.eval.config import JudgeConfig

    judge = None
    if args.judge_url:
        judge = JudgeConfig(base_url=args.judge_url, **({"model": args.judge_model} if args.judge_model else {}))
    if judge is None:  # the summary says once how to add a judge, instead of a warning per evaluation
        logging.getLogger("aov_dist.eval.judge").setLevel(logging.ERROR)
    run_demo(args.size, args.out, args.data, args.tracking_uri, judge=judge, seed=args.seed)


if __name__ == "__main__":
    main()
