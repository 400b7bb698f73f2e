"""The final HF export as an MLflow model (pyfunc wrapping the HF folder) in the Model Registry."""
from __future__ import annotations

import logging
import tempfile
from typing import Optional

import mlflow.pyfunc

from aov_dist.tracking.config import TrackingConfig

log = logging.getLogger(__name__)
HF_ARTIFACT = "hf"


class AnomalyOVPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the HF-format folder with aov_dist's build_model; predict() returns the expert's image
    anomaly scores for a list of image paths (the LLM is reached through aov-eval)."""

    def load_context(self, context) -> None:
        from aov_dist.model import ModelConfig, build_model

        self.model, self.processor = build_model(ModelConfig(pretrained_path=context.artifacts[HF_ARTIFACT]))
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import torch
        from PIL import Image

        paths = list(model_input["image"]) if hasattr(model_input, "__getitem__") else list(model_input)
        scores = []
        with torch.no_grad():
            for p in paths:
                enc = self.processor.encode_images([Image.open(p).convert("RGB")])
                scores.append(float(self.model.expert_forward(enc.pixel_values, enc.image_grids).scores[0]))
        return scores


def log_and_register(cfg: TrackingConfig, run_id: str, hf_dir: str) -> Optional[str]:
    """Returns ``models:/<name>/<version>`` (or the runs:/ URI when no registry name is set)."""
    import mlflow

    from aov_dist.data import fs

    mlflow.set_tracking_uri(cfg.uri)
    local = hf_dir
    tmp = None
    if fs.is_remote(hf_dir):
        tmp = tempfile.TemporaryDirectory()
        fs_, p = fs.get_fs(hf_dir)
        fs_.get(p + "/", tmp.name + "/", recursive=True)
        local = tmp.name
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=AnomalyOVPyfunc(), artifacts={HF_ARTIFACT: local},
                # the environment is this project's; skip pip inference (slow, and it would guess)
                pip_requirements=["aov-dist"],
                registered_model_name=cfg.registered_model_name or None,
            )
        if cfg.registered_model_name and info.registered_model_version is not None:
            return f"models:/{cfg.registered_model_name}/{info.registered_model_version}"
        return info.model_uri
    finally:
        if tmp is not None:
            tmp.cleanup()
