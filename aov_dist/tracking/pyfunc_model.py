"""The MLflow model of a trained Anomaly-OV, logged *from code*: MLflow stores this file's source
next to the HF weights and runs it at load time, so no pickled (cloudpickle) Python object is
written into the registry (tracking/model_registry.py passes this file's path as python_model)."""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc

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

        # a list of paths, or a frame / dict with an "image" column
        paths = list(model_input) if isinstance(model_input, (list, tuple)) else list(model_input["image"])
        scores = []
        with torch.no_grad():
            for p in paths:
                enc = self.processor.encode_images([Image.open(p).convert("RGB")])
                scores.append(float(self.model.expert_forward(enc.pixel_values, enc.image_grids).scores[0]))
        return scores


mlflow.models.set_model(AnomalyOVPyfunc())
