"""Submit training, the evaluation watcher or the cluster probe to a Ray cluster (Ray's Jobs API).

    python launch/submit.py train --nodes 2 --cluster h100 -- stage=stage2 train.storage_path=s3://b/runs
    python launch/submit.py eval  --nodes 1 --cluster h100 -- tracking.uri=http://mlflow:5000
    python launch/submit.py probe --nodes 2 --cluster local -- cluster.workers_per_node=1 --storage /nfs/x

The cluster is RAY_ADDRESS (the head's dashboard, http://<head>:8265) or --address; the job goes
in through ``ray.job_submission.JobSubmissionClient``. The repo is uploaded as the job's working
directory (virtualenv, data and run outputs excluded); the image on the cluster provides the
packages. Only non-secret environment variables travel in the
runtime env, which anyone with dashboard access can read: credentials must already be in the
nodes' environment (Kubernetes Secrets, instance roles).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from aov_dist.cluster import entrypoints as ep
from aov_dist.cluster.compose import REPO_ROOT, compose_cluster
from aov_dist.cluster.config import ClusterConfig, ClusterConfigError, deepspeed_accelerator, validate_cluster

# Uploaded working dir: code and conf only (Ray caps the upload at 500 MiB).
EXCLUDES = [".venv/", ".git/", "data_shards/", "mlruns/", "mlartifacts/", "mlflow.db", "ray_results/",
            "outputs/", "multirun/", "demo_out/", "logs/", "k8s/rendered/", "**/__pycache__/", "*.pyc",
            ".pytest_cache/", "*.egg-info/"]
# Non-secret settings forwarded from the submitting shell when set.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
               "MLFLOW_TRACKING_URI", "DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")
_SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "API_KEY", "CREDENTIAL", "PRIVATE", "AUTH")
KINDS = ("train", "eval", "probe")


class SubmitError(RuntimeError):
    pass


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(w in upper for w in _SECRET_WORDS) or upper.endswith("_KEY")


def runtime_env(extra_env: Sequence[str] = (), environ: Optional[dict[str, str]] = None) -> dict:
    """The job's runtime env: this checkout's git version (AOV_GIT_*), forwarded non-secret variables
    + --env KEY=VALUE, and upload excludes."""
    from aov_dist.tracking.run_info import git_env

    environ = os.environ if environ is None else environ
    # the uploaded working directory has no .git: the runs' source tags come from here
    env = {**git_env(), **{k: environ[k] for k in FORWARD_ENV if environ.get(k)}}
    for item in extra_env:
        if "=" not in item:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        if is_secret_name(key):
            raise SubmitError(
                f"--env {key}: looks like a credential; the runtime env is readable by anyone with access "
                f"to the Ray dashboard. Put it in the nodes' environment instead (a Kubernetes Secret, an "
                f"instance role, or the environment of `ray start`)")
        env[key] = value
    return {"env_vars": env, "excludes": list(EXCLUDES)}


def job_entrypoint(kind: str, preset: str, nodes: int, overrides: Sequence[str]) -> tuple[list[str], ClusterConfig]:
    """Validate the cluster section as the app will see it, and build the job's command line."""
    if kind not in KINDS:
        raise SubmitError(f"unknown job kind {kind!r}: expected one of {KINDS}")
    cfg = compose_cluster(preset, nodes, overrides)
    cfg.validate()
    storage = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{ep.STORAGE_KEY}=")), None)
    if kind == "train" and storage is not None:
        validate_cluster(cfg, storage, nodes, storage_key=ep.STORAGE_KEY)
    if kind == "train":
        return ep.train_command(preset, nodes, overrides), cfg
    if kind == "eval":
        return ep.eval_watch_command(preset, nodes, cfg.num_workers, overrides), cfg
    return ep.probe_command(preset, nodes, overrides), cfg


def new_submission_id(kind: str) -> str:
    return f"aov-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def job_request(submission_id: str, entrypoint: Sequence[str], env: dict,
                working_dir: Path = REPO_ROOT) -> dict:
    """The arguments of ``JobSubmissionClient.submit_job``. Ray runs the entry point through a
    shell: every word is quoted (shlex.join), so an override holding spaces or brackets reaches
    the app as one argument."""
    return {"entrypoint": ep.as_shell(entrypoint), "submission_id": submission_id,
            "runtime_env": {**env, "working_dir": str(working_dir)}}


def follow_hint(submission_id: str, address: str) -> str:
    return (f"  follow logs: ray job logs -f {submission_id} --address {address}\n"
            f"  status:      ray job status {submission_id} --address {address}\n"
            f"  stop:        ray job stop {submission_id} --address {address}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    tail = argv[argv.index("--") + 1:] if "--" in argv else []
    head = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--nodes", type=int, default=None, help="cluster.nodes (train/probe: 1, eval: 1)")
    parser.add_argument("--cluster", default="local", help="preset in conf/cluster/ (local, a100, h100)")
    parser.add_argument("--address", default=None, help="Ray dashboard address; default $RAY_ADDRESS")
    parser.add_argument("--submission-id", default=None)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra non-secret environment variable for the job (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the job (also accepted after --)")
    args = parser.parse_intermixed_args(head)
    args.overrides = [*args.overrides, *tail]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nodes = args.nodes if args.nodes is not None else 1
    try:
        entrypoint, cfg = job_entrypoint(args.kind, args.cluster, nodes, args.overrides)
        env = runtime_env(args.env)
        accelerator = deepspeed_accelerator(cfg, env["env_vars"])  # what the workers will run
    except (SubmitError, ClusterConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address and not args.dry_run:
        local = "make train" if args.kind != "eval" else "make eval"
        print(f"RAY_ADDRESS is not set, so there is no Ray cluster to submit to.\n"
              f"  Submit: RAY_ADDRESS=http://<head>:8265 make launch NODES={nodes} (the head's dashboard address),\n"
              f"          or try it on this machine: make cluster-up, then export the RAY_ADDRESS it prints.\n"
              f"  Run locally instead: {local}\n"
              f"  The job would run: {ep.as_shell(entrypoint)}", file=sys.stderr)
        return 2
    sid = args.submission_id or new_submission_id(args.kind)
    request = job_request(sid, entrypoint, env)
    summary = (f"aov-{args.kind} job {sid!r} -> {address or '$RAY_ADDRESS'}: cluster={cfg.name}, "
               f"{cfg.nodes} node(s) x {cfg.workers_per_node} workers = {cfg.num_workers} workers, "
               f"accelerator={accelerator}, backend={cfg.backend}, max_failures={cfg.max_failures}\n"
               f"  entry point: {ep.as_shell(entrypoint)}")
    if args.dry_run:
        print(f"[dry run] {summary}\n  request: {json.dumps(request, sort_keys=True)}")
        return 0
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).submit_job(**request)
    except Exception as e:  # unreachable head, refused runtime env, a duplicate submission id...
        print(f"submitting to {address} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"Submitted {summary}\n{follow_hint(sid, address)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
