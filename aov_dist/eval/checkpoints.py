"""Checkpoint references for evaluation: discovery, validation and download.

A reference is one of
  * a step folder ``<storage>/<run>/step_<N>/`` (marker ``COMMITTED`` written last, HF model in
    ``hf/``), local or s3:// - the form training records in the tag ``aov.checkpoint.<N>``;
  * an HF-format folder (model + processor) directly;
  * ``runs:/<run_id>/<artifact path>`` or ``models:/<name>/<version>`` (MLflow), downloaded.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

from aov_dist import storage
from aov_dist.train.checkpoint import COMMIT_MARKER, HF_DIR, is_committed, latest_committed_under, step_of


class CheckpointError(RuntimeError):
    pass


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/"))


def latest_local_checkpoint(root: str) -> str:
    """The newest committed step folder under ``root`` (``root/<run>/step_<N>`` or
    ``root/step_<N>``), local or s3:// (train/checkpoint.py's rule)."""
    found = latest_committed_under(root)
    if found is None:
        raise CheckpointError(
            f"eval.checkpoint is null and no committed checkpoint (step_<N>/{COMMIT_MARKER}) was found "
            f"under eval.checkpoint_root={root!r}; train first (make train) or pass checkpoint=<path>")
    return found


def resolve(uri: Optional[str], checkpoint_root: str) -> str:
    """Validate a reference on the driver (no download); None -> the latest local checkpoint."""
    if uri is None:
        return latest_local_checkpoint(checkpoint_root)
    if is_mlflow_uri(uri):
        return uri
    if not storage.exists(uri):
        raise CheckpointError(f"checkpoint {uri!r} does not exist")
    if step_of(uri) is not None and not is_committed(uri):
        raise CheckpointError(f"checkpoint {uri!r} has no {COMMIT_MARKER} marker: not (yet) committed")
    return uri


def _hf_dir(local: str, original: str) -> str:
    # a checkpoint's hf/ folder, a bare HF folder, or a registered model (the pyfunc keeps the HF
    # folder among its artifacts: tracking/model_registry.py)
    for sub in (HF_DIR, "", os.path.join("artifacts", HF_DIR)):
        if os.path.isfile(os.path.join(local, sub, "config.json")):
            return os.path.join(local, sub) if sub else local
    raise CheckpointError(f"checkpoint {original!r} holds no HF model (no config.json in it, in {HF_DIR}/ "
                          f"or in a registered model's artifacts/{HF_DIR}/)")


def materialize(uri: str, cache_dir: Optional[str] = None) -> str:
    """A local HF-format folder for ``uri`` (downloading remote and MLflow references)."""
    if is_mlflow_uri(uri):
        import mlflow

        dst = tempfile.mkdtemp(prefix="aov-ckpt-", dir=cache_dir)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
        except Exception as e:
            raise CheckpointError(f"cannot download checkpoint {uri!r} from MLflow: {e}") from e
        return _hf_dir(local, uri)
    if storage.is_remote(uri):
        hf = f"{uri.rstrip('/')}/{HF_DIR}"
        dst = tempfile.mkdtemp(prefix="aov-ckpt-", dir=cache_dir)
        storage.copy_to_local(hf if storage.exists(hf) else uri, dst)
        return _hf_dir(dst, uri)
    return _hf_dir(storage.local_path(uri), uri)
