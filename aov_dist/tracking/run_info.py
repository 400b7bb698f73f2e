"""What a run says about itself in MLflow, so that dozens of runs compare at a glance.

* its name: ``<model preset>/<stage>/<run name>``;
* the parameters people compare (``compared_params``) as flat params; the whole resolved config
  stays the ``config.yaml`` artifact;
* the data it read: one MLflow dataset input per data source, named after it, with the
  manifest's content digest, its URL and its sample count (the runs table's Dataset column);
* the source version: MLflow's git tags, read where the job was launched from (a Ray job's
  working directory carries no ``.git``, so the submitter passes them on in ``AOV_GIT_*``).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import urllib.parse
from typing import Any, Mapping, Optional, Sequence

from aov_dist import storage
from aov_dist.tracking.redact import flatten

log = logging.getLogger(__name__)

# MLflow's experiment kind: the UI shows training runs (its "Model training" view) first, not the
# GenAI trace overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# The UI remembers GenAI vs model training per browser; this query parameter picks the view.
TRAINING_VIEW_QUERY = "workflowType=machine_learning"

# Config keys shown as params, in this order; stage.lr.<group> and cluster.workers are added.
COMPARED_KEYS = (
    "model.preset", "stage.name", "stage.global_batch_size", "stage.max_steps", "stage.epochs",
    "stage.init_from", "data.micro_batch_size", "data.max_length", "data.packing",
    "deepspeed.zero_stage", "deepspeed.precision", "cluster.name", "cluster.nodes", "train.seed",
)
# Set by the job submitter from its checkout (the workers' copy has no .git).
GIT_ENV = {"commit": "AOV_GIT_COMMIT", "branch": "AOV_GIT_BRANCH", "repo": "AOV_GIT_REPO", "dirty": "AOV_GIT_DIRTY"}
DIGEST_CHARS = 16  # MLflow stores dataset digests in 36 characters


def run_display_name(preset: str, stage: str, run_name: str) -> str:
    return f"{preset}/{stage}/{run_name}"


def training_runs_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI page listing an experiment's training runs."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW_QUERY}"


def compared_params(resolved: Mapping[str, Any]) -> dict[str, str]:
    """The flat params of a training run, from its resolved config (a nested dict)."""
    flat = flatten(resolved)
    out = {k: _text(flat.get(k)) for k in COMPARED_KEYS if k in flat}
    for k in sorted(flat):
        if k.startswith("stage.lr."):
            out[k] = _text(flat[k])
    cluster = resolved.get("cluster", {})
    if "nodes" in cluster and "workers_per_node" in cluster:
        out["cluster.workers"] = str(cluster["nodes"] * cluster["workers_per_node"])
    datasets = resolved.get("data", {}).get("datasets") or []
    out["data.datasets"] = ",".join(f"{d.get('name')}:{d.get('weight', 1.0):g}" for d in datasets)
    return out


def _text(value: Any) -> str:
    return "None" if value is None else str(value)


# ------------------------------------------------------------------ source version
def git_info(path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """commit, branch, repo (credentials stripped) and dirty of the checkout this code runs from;
    the submitter's values (``AOV_GIT_*``) win. Empty outside a git checkout."""
    environ = os.environ if environ is None else environ
    if environ.get(GIT_ENV["commit"]):
        return {k: environ[v] for k, v in GIT_ENV.items() if environ.get(v)}
    try:
        import git

        repo = git.Repo(path or os.path.dirname(os.path.abspath(__file__)), search_parent_directories=True)
        info = {"commit": repo.head.commit.hexsha, "dirty": str(repo.is_dirty()).lower()}
        if not repo.head.is_detached:
            info["branch"] = repo.active_branch.name
        if repo.remotes:
            info["repo"] = _without_credentials(repo.remotes[0].url)
        return info
    except Exception:  # no checkout (an installed wheel), no git binary: no source tags
        return {}


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    return urllib.parse.urlunsplit(parts) if parts.scheme else url


def git_env(path: Optional[str] = None) -> dict[str, str]:
    """The ``AOV_GIT_*`` variables a submitter hands to the job."""
    return {GIT_ENV[k]: v for k, v in git_info(path, environ={}).items()}


def source_tags(entry_point: str, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """MLflow's system tags for where a run comes from (the runs table's Source and Version)."""
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": entry_point}
    with_user = environ if environ is not None else os.environ
    try:
        tags["mlflow.user"] = with_user.get("AOV_USER") or getpass.getuser()
    except Exception:  # no user name in a container without /etc/passwd entry
        pass
    git = git_info(environ=environ)
    for key, tag in (("commit", "mlflow.source.git.commit"), ("branch", "mlflow.source.git.branch"),
                     ("repo", "mlflow.source.git.repoURL"), ("dirty", "aov.git.dirty")):
        if git.get(key):
            tags[tag] = git[key]
    return tags


# ------------------------------------------------------------------ dataset inputs
def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """A digest of the shards' contents (their checksums and sample counts), not of when the
    manifest was written: the same data sharded twice has the same digest."""
    shards = [(s.get("url"), s.get("sha256"), s.get("samples")) for s in manifest.get("shards", [])]
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]


def manifest_dataset(name: str, manifest_url: str, endpoint_url: Optional[str] = None):
    """An MLflow dataset entity for one data source (shard manifest, local or s3://)."""
    from mlflow.entities import Dataset

    manifest = json.loads(storage.read_bytes(manifest_url, endpoint_url))
    totals = manifest.get("totals", {})
    profile = {"num_samples": totals.get("samples"), "num_shards": totals.get("shards"),
               "labels": totals.get("labels")}
    return Dataset(name=name, digest=manifest_digest(manifest), source_type=storage.scheme(manifest_url) or "local",
                   source=json.dumps({"uri": manifest_url}), schema=None, profile=json.dumps(profile))


def dataset_inputs(datasets: Sequence[Any], context: str, endpoint_url: Optional[str] = None) -> list:
    """Dataset inputs (``mlflow.data.context`` = training / evaluation) for ``datasets`` with
    ``name`` and ``manifest``. A manifest that cannot be read is left out with a warning: the job
    itself reports unreadable data, naming the file."""
    from mlflow.entities import DatasetInput, InputTag

    out = []
    for d in datasets:
        try:
            entity = manifest_dataset(d.name, d.manifest, endpoint_url)
        except Exception as e:
            log.warning("dataset %s: manifest %s not read for MLflow (%s)", d.name, d.manifest, e)
            continue
        out.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
    return out
