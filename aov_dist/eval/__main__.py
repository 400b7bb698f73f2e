"""`aov-eval`: evaluate a checkpoint on VisA-D&R (or the synthetic twin), or follow MLflow.

    aov-eval                                   # latest local checkpoint, conf/eval/synthetic.yaml
    aov-eval checkpoint=runs:/<id>/step_40 num_workers=4
    aov-eval checkpoint=models:/aov-tiny-stage2/3 judge.base_url=http://127.0.0.1:8000/v1
    aov-eval watch run_id=<training run id>    # or: mode=watch (follows tracking.experiment)

Keys of the eval section may be given bare (``checkpoint=...`` is ``eval.checkpoint=...``).
Hydra is kept inert: no output folder, no change of working directory, logging to stdout.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from aov_dist.config import CONF_DIR
from aov_dist.eval.config import EvalAppConfig, EvalConfig, register_configs, validate

log = logging.getLogger("aov_dist.eval")
_EVAL_KEYS = {f.name for f in dataclasses.fields(EvalConfig)}
_INERT_HYDRA = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout",
                "hydra/hydra_logging=none"]


def rewrite_argv(argv: list[str]) -> list[str]:
    """`watch` -> mode=watch; bare eval keys (checkpoint=..., judge.model=...) -> eval.<key>."""
    out = []
    for arg in argv:
        if arg in ("watch", "run"):
            out.append(f"mode={arg}")
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and key.split(".", 1)[0] in _EVAL_KEYS and not arg.startswith("hydra"):
            prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
            out.append(f"{prefix}eval.{arg.lstrip('+~')}")
        else:
            out.append(arg)
    return out


def mlflow_client(tracking):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking.uri)
    return MlflowClient(tracking_uri=tracking.uri)


def run_once(app: EvalAppConfig) -> dict:
    from aov_dist.eval.checkpoints import resolve
    from aov_dist.eval.evaluate import evaluate, log_result
    from aov_dist.eval.report import render

    checkpoint = resolve(app.eval.checkpoint, app.eval.checkpoint_root)
    log.info("evaluating %s on %s with %d workers", checkpoint, app.eval.benchmark, app.eval.num_workers)
    # The pictures exist only as MLflow artifacts: without tracking the maps are not even computed.
    result = evaluate(app.eval, checkpoint, app.cluster, tracking_uri=app.tracking.uri,
                      with_maps=app.eval.plots and app.tracking.enabled)
    if app.tracking.enabled:
        from aov_dist.tracking.mlflow_tracker import ensure_experiment

        client = mlflow_client(app.tracking)
        run = client.create_run(ensure_experiment(client, app.tracking),
                                run_name=app.tracking.run_name or "eval",
                                tags={"aov.kind": "evaluation"})
        rid = run.info.run_id
        for k, v in {"checkpoint": checkpoint, "benchmark": app.eval.benchmark,
                     "num_workers": app.eval.num_workers, "batch_size": app.eval.batch_size,
                     "max_new_tokens": app.eval.max_new_tokens, "judge_model": app.eval.judge.model,
                     "judge_endpoint": bool(app.eval.judge.base_url)}.items():
            client.log_param(rid, k, v)
        log_result(client, rid, result, pictures=app.eval.plots)
        client.set_terminated(rid, "FINISHED")
        log.info("logged to MLflow run %s (%s)", rid, app.tracking.uri)
    if app.print_table:
        print(render(result.metrics, label="this checkpoint", notes=result.notes))
    return result.metrics


def run_watch(app: EvalAppConfig) -> None:
    from aov_dist.eval.evaluate import Evaluator
    from aov_dist.eval.watch import Watcher

    client = mlflow_client(app.tracking)
    # one pool of eval workers serves consecutive checkpoints; released when a poll finds nothing
    with Evaluator(app.eval, app.cluster, tracking_uri=app.tracking.uri) as evaluator:
        watcher = Watcher(client, evaluator, app.eval.max_attempts, pictures=app.eval.plots)
        watcher.watch(experiment=app.tracking.experiment, run_id=app.run_id, poll_s=app.eval.poll_s,
                      max_idle_polls=app.eval.max_idle_polls)


def main(cfg: DictConfig) -> Optional[dict]:
    app: EvalAppConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(app.eval, app.mode)
    if app.mode == "watch":
        run_watch(app)
        return None
    return run_once(app)


def cli() -> None:
    register_configs()
    # inert settings first: argparse wants the overrides contiguous, before flags like --cfg
    sys.argv = [sys.argv[0], *_INERT_HYDRA, *rewrite_argv(sys.argv[1:])]
    hydra.main(config_path=str(CONF_DIR), config_name="aov_eval_schema", version_base="1.3")(main)()


if __name__ == "__main__":
    cli()
