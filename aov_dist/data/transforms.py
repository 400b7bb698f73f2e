"""Glue between raw samples (docs/architecture.md §1) and the model's processor (§3).

Picklable callables, so DataLoader workers can be forked or spawned::

    processor = ...  # aov_dist.model.processor.AnomalyOVProcessor
    stage2 = build_loader(cfg, rank, world, transform=ConversationTransform(processor, cfg.max_length),
                          collate=processor.collate)
    stage1 = build_loader(cfg, rank, world, stage="stage1", transform=ExpertTransform(processor),
                          collate=processor.collate)

A sample whose image tokens alone exceed ``max_length`` makes the processor raise
``ImageTokensExceedMaxLength``; the loader drops it and counts it under ``too_long``.
"""
from __future__ import annotations

from typing import Any


class ConversationTransform:
    """Stage 2: ``processor.encode_conversation`` of a raw sample.

    The label is not passed on: stage-2 batches carry no ``image_labels`` (and the collator needs
    the same keys in every sample, while labels are known for some samples only).
    """

    def __init__(self, processor: Any, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, raw: dict) -> dict:
        return self.processor.encode_conversation(raw["images"], raw["conversations"], self.max_length,
                                                  sample_id=raw["id"])


class ExpertTransform:
    """Stage 1: images and label only (``processor.encode_expert_sample``); needs stage="stage1"."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, raw: dict) -> dict:
        if raw["label"] is None:
            raise ValueError(f"sample {raw['id']!r} has no label: build the loader with stage='stage1'")
        return self.processor.encode_expert_sample(raw["images"], raw["label"])


class PackedCollate:
    """Stage 2 with ``data.packing``: ``processor.collate_packed`` of a micro-batch's samples."""

    def __init__(self, processor: Any, max_length: int, one_row: bool):
        self.processor, self.max_length, self.one_row = processor, max_length, one_row

    def __call__(self, samples: list) -> dict:
        return self.processor.collate_packed(samples, self.max_length, one_row=self.one_row)
