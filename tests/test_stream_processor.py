"""The streaming loader with the model's real processor: batches in the §3 format, too_long drops."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aov_dist.data.stream import build_loader
from aov_dist.data.transforms import ConversationTransform, ExpertTransform
from aov_dist.model.processor import ImageTokensExceedMaxLength
from shard_helpers import cfg_for, write_shards

BATCH_KEYS = {"input_ids", "attention_mask", "labels", "token_type", "pixel_values", "image_grids",
              "image_sizes"}


@pytest.fixture(scope="module")
def processor():
    from aov_dist.model.presets import tiny_processor

    return tiny_processor()


def test_stage2_batches_and_too_long_drops(tmp_path: Path, processor) -> None:
    views = {i: 4 for i in (2, 5, 9)}  # multi-view samples need far more image tokens
    manifest, _ = write_shards(tmp_path, [6, 6], views=views)
    # max_length that a single-image sample fits exactly and a 4-view sample cannot
    single = ConversationTransform(processor, 10**6)
    loader0 = build_loader(cfg_for(manifest, micro_batch_size=1, num_workers=0, block_size=1),
                           0, 1, stage="stage2")
    raws = {s["id"]: s for b in loader0 for s in b}
    max_len = len(single(raws["s00000"])["input_ids"])
    with pytest.raises(ImageTokensExceedMaxLength):
        ConversationTransform(processor, max_len)(raws["s00002"])

    cfg = cfg_for(manifest, micro_batch_size=2, num_workers=2, block_size=4, max_length=max_len)
    loader = build_loader(cfg, 0, 1, transform=ConversationTransform(processor, cfg.max_length),
                          collate=processor.collate)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 6
    for b in batches:
        assert set(b) == BATCH_KEYS
        assert b["input_ids"].shape[0] == 2 and b["input_ids"].shape[1] <= max_len
        assert b["image_grids"].shape == (2, 2) and b["pixel_values"].dtype == torch.float32
    assert loader.skipped["too_long"] >= 3 and set(loader.skipped) == {"too_long"}


def test_stage1_batches_carry_image_labels(tmp_path: Path, processor) -> None:
    labels = {i: i % 2 for i in range(12)}
    labels[3] = None
    manifest, _ = write_shards(tmp_path, [6, 6], labels=labels, views={4: 4})
    cfg = cfg_for(manifest, micro_batch_size=2, num_workers=0, block_size=4)
    loader = build_loader(cfg, 0, 1, stage="stage1", transform=ExpertTransform(processor),
                          collate=processor.collate)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 5  # 11 labelled of 12 -> 11 // 2
    for b in batches:
        assert set(b) == {"pixel_values", "image_grids", "image_sizes", "image_labels"}
        assert b["image_labels"].shape == (2,) and set(b["image_labels"].tolist()) <= {0.0, 1.0}
    # both are met in their span; a replacement drawn from the refill sequence may meet one again
    assert set(loader.filtered) == {"unlabelled", "multi_view"} and min(loader.filtered.values()) >= 1
