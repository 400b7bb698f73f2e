"""What a stage trains: its model, its data stream and its loss. The loop around them is shared.

A task is any object with ``stage``, ``build_model(cfg, gather=None)``, ``build_loader(cfg,
processor, rank, world)`` and ``loss(strategy, batch) -> loss`` (the batch is already on the engine's
device: the loop moved it; the model runs through ``strategy.forward`` / ``strategy.call``); tests
swap in their own (e.g. a loader that hands every world size the same global batches).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F

from aov_dist.config import TrainJobConfig
from aov_dist.model.config import ModelConfig

log = logging.getLogger(__name__)


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the positive-class and negative-class BCE (each class weighs half whatever the
    batch's balance); a batch holding one class only uses that class's mean. Computed with masks
    rather than by asking which classes are present: no host sync on a GPU."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    pos = (labels > 0.5).float()
    masks = torch.stack([pos, 1.0 - pos])  # [2, N]
    counts = masks.sum(dim=1)
    means = (masks * losses).sum(dim=1) / counts.clamp(min=1.0)
    present = (counts > 0).float()
    return (means * present).sum() / present.sum()


def model_config_for(cfg: TrainJobConfig) -> ModelConfig:
    """Stage 2 starts from a stage-1 result: an HF folder / committed step folder (whole model) or
    an expert .pth (released pretrained_expert_*.pth) on top of the model section's weights."""
    from aov_dist.config import training_precision
    from aov_dist import storage

    # built in the precision DeepSpeed trains in (zero.Init partitions it so, at once)
    model = dataclasses.replace(cfg.model, dtype=training_precision(cfg))
    init = cfg.stage.init_from
    if not init:
        return model
    if init.endswith((".pth", ".pt", ".bin")):
        return dataclasses.replace(model, expert_path=init)
    hf = f"{init.rstrip('/')}/hf"
    # the architecture comes from the folder: preset overrides no longer apply
    return dataclasses.replace(model, pretrained_path=hf if storage.exists(f"{hf}/config.json") else init, overrides={},
                               random_init=False)


class _ModelTask:
    stage = ""

    def build_model(self, cfg: TrainJobConfig, gather=None):
        from aov_dist.model import build_model

        return build_model(model_config_for(cfg), gather)

    def transform(self, processor: Any, cfg: TrainJobConfig):
        raise NotImplementedError

    def collate(self, processor: Any, cfg: TrainJobConfig):
        return processor.collate

    def build_loader(self, cfg: TrainJobConfig, processor: Any, rank: int, world: int):
        from aov_dist.data.stream import build_loader

        return build_loader(cfg.data, rank, world, transform=self.transform(processor, cfg),
                            collate=self.collate(processor, cfg), stage=self.stage,
                            pin_memory=cfg.cluster.use_gpu, global_batch_size=cfg.stage.global_batch_size)


class Stage1Task(_ModelTask):
    """The expert alone on labelled images: balanced BCE on the image anomaly logit."""

    stage = "stage1"

    def transform(self, processor: Any, cfg: TrainJobConfig):
        from aov_dist.data.transforms import ExpertTransform

        return ExpertTransform(processor)

    def loss(self, strategy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # through the engine's forward, never the module directly: ZeRO-3 accumulation needs its hooks
        out = strategy.call("expert_forward", batch["pixel_values"], batch["image_grids"])
        return balanced_bce(out.logits, batch["image_labels"])


class Stage2Task(_ModelTask):
    """Projector + LLM on conversations: the causal-LM loss on assistant tokens."""

    stage = "stage2"

    def transform(self, processor: Any, cfg: TrainJobConfig):
        from aov_dist.data.transforms import ConversationTransform

        return ConversationTransform(processor, cfg.data.max_length)

    def collate(self, processor: Any, cfg: TrainJobConfig):
        if not cfg.data.packing:
            return processor.collate
        from aov_dist.data.transforms import PackedCollate
        from aov_dist.model.attention import resolve_attn_implementation

        # FlashAttention-2 finds packed samples in one row only (processor.collate_packed)
        one_row = resolve_attn_implementation(cfg.model.attn_implementation) == "flash_attention_2"
        if cfg.data.micro_batch_size == 1:
            log.warning("data.packing=true with data.micro_batch_size=1: every micro-batch holds one sample, "
                        "so there is no padding to remove; raise data.micro_batch_size to pack")
        log.info("packing: %s", "all samples of a micro-batch in one row (FlashAttention-2)" if one_row
                 else f"rows of up to data.max_length={cfg.data.max_length} tokens (SDPA)")
        return PackedCollate(processor, cfg.data.max_length, one_row)

    def loss(self, strategy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return strategy.forward(**batch).loss


def make_task(stage: str):
    return {"stage1": Stage1Task, "stage2": Stage2Task}[stage]()
