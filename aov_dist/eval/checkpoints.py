"""Checkpoint references for evaluation: discovery, validation and download.

A reference is one of
  * a step folder ``<storage>/<run>/step_<N>/`` (marker ``COMMITTED`` written last, HF model in
    ``hf/``), local or s3:// - the form training records in the tag ``aov.checkpoint.<N>``;
  * an HF-format folder (model + processor) directly;
  * ``runs:/<run_id>/<artifact path>`` or ``models:/<name>/<version>`` (MLflow), downloaded.
"""
from __future__ import annotations

import os
import posixpath
import re
import tempfile
from typing import Optional

from aov_dist.data import fs as data_fs

COMMIT_MARKER = "COMMITTED"
HF_SUBDIR = "hf"
_STEP = re.compile(r"step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/"))


def step_of(uri: str) -> Optional[int]:
    m = _STEP.search(uri.rstrip("/"))
    return int(m.group(1)) if m else None


def is_committed(step_dir: str) -> bool:
    return data_fs.exists(step_dir.rstrip("/") + "/" + COMMIT_MARKER)


def latest_local_checkpoint(root: str) -> str:
    """The committed step folder under ``root/<run>/step_<N>`` (or ``root/step_<N>``), local or
    s3://, whose marker is newest (ties: the higher step)."""
    fs, path = data_fs.get_fs(root)
    markers = fs.glob(f"{path}/*/step_*/{COMMIT_MARKER}") + fs.glob(f"{path}/step_*/{COMMIT_MARKER}")
    if not markers:
        raise CheckpointError(
            f"eval.checkpoint is null and no committed checkpoint (step_<N>/{COMMIT_MARKER}) was found "
            f"under eval.checkpoint_root={root!r}; train first (make train) or pass checkpoint=<path>")

    def newest_first(marker: str) -> tuple[float, int]:
        info = fs.info(marker)
        stamp = info.get("mtime", info.get("LastModified", 0))
        stamp = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0)
        return stamp, step_of(posixpath.dirname(marker)) or -1

    found = posixpath.dirname(max(markers, key=newest_first))
    return f"s3://{found}" if data_fs.is_remote(root) else found


def resolve(uri: Optional[str], checkpoint_root: str) -> str:
    """Validate a reference on the driver (no download); None -> the latest local checkpoint."""
    if uri is None:
        return latest_local_checkpoint(checkpoint_root)
    if is_mlflow_uri(uri):
        return uri
    if not data_fs.exists(uri):
        raise CheckpointError(f"checkpoint {uri!r} does not exist")
    if step_of(uri) is not None and not is_committed(uri):
        raise CheckpointError(f"checkpoint {uri!r} has no {COMMIT_MARKER} marker: not (yet) committed")
    return uri


def _hf_dir(local: str, original: str) -> str:
    if os.path.isfile(os.path.join(local, HF_SUBDIR, "config.json")):
        return os.path.join(local, HF_SUBDIR)
    if os.path.isfile(os.path.join(local, "config.json")):
        return local
    raise CheckpointError(f"checkpoint {original!r} holds no HF model (no config.json in it or in {HF_SUBDIR}/)")


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
    if "://" in uri and not uri.startswith("file://"):
        fs, path = data_fs.get_fs(uri)
        src = path.rstrip("/") + (f"/{HF_SUBDIR}" if fs.exists(path.rstrip("/") + f"/{HF_SUBDIR}") else "")
        dst = tempfile.mkdtemp(prefix="aov-ckpt-", dir=cache_dir)
        fs.get(src + "/", dst + "/", recursive=True)
        return _hf_dir(dst, uri)
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return _hf_dir(local, uri)
