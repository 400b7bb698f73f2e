"""What a stage trains: its model, its data stream and its loss. The loop around them is shared.

A task is any object with ``stage``, ``build_model(cfg)``, ``build_loader(cfg, processor, rank,
world)`` and ``loss(engine, batch) -> (loss, tokens)``; tests swap in their own (e.g. a loader
that hands every world size the same global batches, for the golden-loss comparison).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from aov_dist.config import TrainJobConfig
from aov_dist.model.config import ModelConfig


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the positive-class and negative-class BCE (each class weighs half whatever the
    batch's balance); a batch holding one class only uses that class's mean."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    pos = labels > 0.5
    terms = [losses[m].mean() for m in (pos, ~pos) if bool(m.any())]
    return torch.stack(terms).mean()


def model_config_for(cfg: TrainJobConfig) -> ModelConfig:
    """Stage 2 starts from a stage-1 result: an HF folder / committed step folder (whole model) or
    an expert .pth (released pretrained_expert_*.pth) on top of the model section's weights."""
    from aov_dist.data import fs

    init = cfg.stage.init_from
    if not init:
        return cfg.model
    if init.endswith((".pth", ".pt", ".bin")):
        return dataclasses.replace(cfg.model, expert_path=init)
    hf = f"{init.rstrip('/')}/hf"
    # the architecture comes from the folder: preset overrides no longer apply
    return dataclasses.replace(cfg.model, pretrained_path=hf if fs.exists(f"{hf}/config.json") else init, overrides={})


class _ModelTask:
    stage = ""

    def build_model(self, cfg: TrainJobConfig):
        from aov_dist.model import build_model

        return build_model(model_config_for(cfg))

    def transform(self, processor: Any, cfg: TrainJobConfig):
        raise NotImplementedError

    def build_loader(self, cfg: TrainJobConfig, processor: Any, rank: int, world: int):
        from aov_dist.data.stream import build_loader

        return build_loader(cfg.data, rank, world, transform=self.transform(processor, cfg),
                            collate=processor.collate, stage=self.stage)


class Stage1Task(_ModelTask):
    """The expert alone on labelled images: balanced BCE on the image anomaly logit."""

    stage = "stage1"

    def transform(self, processor: Any, cfg: TrainJobConfig):
        from aov_dist.data.transforms import ExpertTransform

        return ExpertTransform(processor)

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        from aov_dist.train.strategy import engine_call

        # through engine.forward, never engine.module directly: ZeRO-3 accumulation needs its hooks
        out = engine_call(engine, "expert_forward", batch["pixel_values"], batch["image_grids"])
        return balanced_bce(out.logits, batch["image_labels"]), 0


class Stage2Task(_ModelTask):
    """Projector + LLM on conversations: the causal-LM loss on assistant tokens."""

    stage = "stage2"

    def transform(self, processor: Any, cfg: TrainJobConfig):
        from aov_dist.data.transforms import ConversationTransform

        return ConversationTransform(processor, cfg.data.max_length)

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        out = engine(**batch)
        return out.loss, int(batch["attention_mask"].sum())


def make_task(stage: str):
    return {"stage1": Stage1Task, "stage2": Stage2Task}[stage]()
