"""The final HF export as an MLflow model (pyfunc wrapping the HF folder) in the Model Registry.

The pyfunc is logged from code (tracking/pyfunc_model.py, MLflow's models-from-code): the registry
holds that source file and the safetensors weights, never a pickled Python object that loading
would have to unpickle."""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Optional

import mlflow.pyfunc

from aov_dist.tracking.config import TrackingConfig

log = logging.getLogger(__name__)
HF_ARTIFACT = "hf"  # the artifact name pyfunc_model.py reads
# a path, not an import: importing the file would run its mlflow.models.set_model
MODEL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc_model.py")


def log_and_register(cfg: TrackingConfig, run_id: str, hf_dir: str, name: Optional[str]) -> Optional[str]:
    """Returns ``models:/<name>/<version>`` (or the runs:/ URI when ``name`` is None: logged, not
    registered)."""
    import mlflow

    from aov_dist import storage

    mlflow.set_tracking_uri(cfg.uri)
    local = hf_dir
    tmp = None
    if storage.is_remote(hf_dir):
        tmp = tempfile.TemporaryDirectory()
        storage.copy_to_local(hf_dir, tmp.name)
        local = tmp.name
    try:
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # predict() takes image paths or a frame with an "image" column: no type-hint signature
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=MODEL_CODE, artifacts={HF_ARTIFACT: local},
                # the environment is this project's; skip pip inference (slow, and it would guess)
                pip_requirements=["aov-dist"],
                registered_model_name=name,
            )
        if name and info.registered_model_version is not None:
            return f"models:/{name}/{info.registered_model_version}"
        return info.model_uri
    finally:
        if tmp is not None:
            tmp.cleanup()
