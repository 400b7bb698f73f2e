"""Per-worker inference: detection prompts and turn-by-turn reasoning, batched greedy decoding.

A Predictor holds one loaded model (a ``Backend``) and answers whole batches planned by the
driver. Batches are formed globally before they are handed out (runner.py), so a sample's batch
mates, padding and therefore its reply do not depend on the number of workers.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Collection, Optional, Protocol, Sequence

from PIL import Image

from aov_dist.eval.benchmark import DetectionItem, ReasoningItem, load_image
from aov_dist.eval.metrics import is_yes

log = logging.getLogger(__name__)

# The paper's detection question, verbatim (the official scripts put "<image>\n" in front).
DETECTION_QUESTION = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."
IMAGE_TOKEN = "<image>"

Message = dict[str, str]  # LLaVA style: {"from": "human" | "gpt", "value": str}


class Backend(Protocol):
    """What a predictor needs from a model: batched greedy replies and expert image scores."""

    def generate(self, images: Sequence[Image.Image], conversations: Sequence[list[Message]]) -> list[str]:
        """One reply per (image, conversation); each conversation ends with a human message."""
        ...

    def image_scores(self, images: Sequence[Image.Image]) -> list[Optional[float]]:
        ...

    # Optional (the predictor checks with hasattr): the expert's significance map of each image's
    # base view, grid x grid, as nested lists (plain data: rows stay comparable and picklable).
    # def anomaly_maps(self, images: Sequence[Image.Image]) -> list[list[list[float]]]: ...


def first_question(question: str) -> str:
    return f"{IMAGE_TOKEN}\n{question}"


class AnomalyOVBackend:
    """Backend over aov_dist.model (HF-format folder: model + processor).

    Loading goes through the model package's build_model, so dtype (bf16 on GPU, fp32 on CPU),
    attention implementation and the generation config's eos/pad ids match training.
    """

    def __init__(self, hf_dir: str, max_new_tokens: int = 64, device: Optional[str] = None):
        import torch

        from aov_dist.model import ModelConfig, build_model

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, self.processor = build_model(ModelConfig(pretrained_path=hf_dir))
        self.model = model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def _batch(self, images: Sequence[Image.Image], conversations: Sequence[list[Message]]) -> dict[str, Any]:
        from aov_dist.devices import move_to_device
        from aov_dist.model.anomaly_ov import HOST_INPUTS

        encoded = [self.processor.encode_prompt([img], conv) for img, conv in zip(images, conversations)]
        batch = self.processor.collate(encoded, padding_side="left")
        return move_to_device(batch, self.device, keep_on_host=HOST_INPUTS)

    def generate(self, images, conversations):
        batch = self._batch(images, conversations)
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, batch["input_ids"].shape[1]:]  # left padding: every prompt ends at L
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def _expert(self, images):
        batch = self._batch(images, [[{"from": "human", "value": first_question(DETECTION_QUESTION)}]] * len(images))
        with self.torch.inference_mode():
            return self.model.expert_forward(batch["pixel_values"], batch["image_grids"]), batch["image_grids"]

    def image_scores(self, images):
        out, _ = self._expert(images)
        return [float(s) for s in out.scores.float().cpu().reshape(-1)]

    def anomaly_maps(self, images):
        out, grids = self._expert(images)
        return [m.tolist() for m in base_view_maps(out.maps, grids)]


def base_view_maps(maps, image_grids) -> list:
    """maps [V, g, g] of every view -> one [g, g] float32 CPU tensor per image: its base view, the
    first view of each image (architecture.md section 3; view_index is the model's own layout)."""
    from aov_dist.model.anomaly_ov import view_index

    is_base = view_index(image_grids.cpu(), maps.device).is_base
    if int(is_base.numel()) != maps.shape[0]:
        raise ValueError(f"base_view_maps: {maps.shape[0]} maps but image_grids describe {is_base.numel()} views")
    return list(maps[is_base].float().cpu())


def absolute_tracking_uri(uri: Optional[str]) -> Optional[str]:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: workers may run in another folder."""
    import os

    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def anomaly_ov_factory(checkpoint: str, max_new_tokens: int, use_gpu: bool,
                       tracking_uri: Optional[str] = None) -> Callable[[], Backend]:
    """A picklable recipe that builds the backend inside the worker (download + one model load).

    ``tracking_uri`` is needed on the workers for runs:/ and models:/ checkpoints.
    """
    tracking_uri = absolute_tracking_uri(tracking_uri)

    def build() -> Backend:
        from aov_dist.eval.checkpoints import is_mlflow_uri, materialize

        if tracking_uri and is_mlflow_uri(checkpoint):
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        return AnomalyOVBackend(materialize(checkpoint), max_new_tokens, "cuda" if use_gpu else "cpu")

    return build


class Predictor:
    def __init__(self, backend_factory: Callable[[], Backend], root: str, max_image_side: int = 1024,
                 map_indices: Collection[int] = ()):
        self.backend = backend_factory()
        self.root = root
        self.max_image_side = max_image_side
        # detection records (by index) whose expert map goes into their row as "anomaly_map"
        self.map_indices = frozenset(map_indices)

    def _maps(self, items: Sequence[DetectionItem], images: list[Image.Image]) -> dict[int, list]:
        """Base-view maps of the selected items (by position); for pictures only, so a failure is
        a warning and the row simply has no map."""
        picked = [k for k, it in enumerate(items) if it.index in self.map_indices]
        if not picked or not hasattr(self.backend, "anomaly_maps"):
            return {}
        try:
            return dict(zip(picked, self.backend.anomaly_maps([images[k] for k in picked])))
        except Exception as e:  # noqa: BLE001 - pictures must never fail an evaluation
            log.warning("anomaly maps for records %s failed (%s: %s); no overlay for them",
                        [items[k].index for k in picked], type(e).__name__, e)
            return {}

    def _images(self, rel_paths: Sequence[str]) -> list[Image.Image]:
        return [load_image(self.root, p, self.max_image_side) for p in rel_paths]

    def detect(self, items: Sequence[DetectionItem]) -> list[dict[str, Any]]:
        images = self._images([it.image for it in items])
        prompt = first_question(DETECTION_QUESTION)
        replies = self.backend.generate(images, [[{"from": "human", "value": prompt}] for _ in items])
        scores = self.backend.image_scores(images)
        rows = [{"index": it.index, "image": it.image, "class": it.cls, "anomaly": it.anomaly,
                 "prompt": prompt, "reply": reply, "predicted_anomaly": is_yes(reply),
                 "expert_score": score}
                for it, reply, score in zip(items, replies, scores)]
        for k, amap in self._maps(items, images).items():
            rows[k]["anomaly_map"] = amap  # popped by evaluate() before any table is built
        return rows

    def reason(self, items: Sequence[ReasoningItem]) -> list[dict[str, Any]]:
        """Turn by turn: the model's own earlier answers (not the references) form the history."""
        images = self._images([it.image for it in items])
        histories: list[list[Message]] = [[] for _ in items]
        rows: list[dict[str, Any]] = []
        for t in range(max(len(it.turns) for it in items)):
            active = [i for i, it in enumerate(items) if t < len(it.turns)]
            for i in active:
                q = items[i].turns[t].question
                histories[i].append({"from": "human", "value": first_question(q) if t == 0 else q})
            replies = self.backend.generate([images[i] for i in active], [list(histories[i]) for i in active])
            for i, reply in zip(active, replies):
                turn = items[i].turns[t]
                histories[i].append({"from": "gpt", "value": reply})
                rows.append({"index": items[i].index, "turn": t, "image": items[i].image,
                             "class": items[i].cls, "kind": turn.kind, "question": turn.question,
                             "reference": turn.reference, "reply": reply})
        rows.sort(key=lambda r: (r["index"], r["turn"]))
        return rows

    def run(self, task: str, items: Sequence[Any]) -> list[dict[str, Any]]:
        if task == "detection":
            return self.detect(items)
        if task == "reasoning":
            return self.reason(items)
        raise ValueError(f"unknown task {task!r}")
