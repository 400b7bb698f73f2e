"""Synthetic stage-2 batches of a fixed shape, for checks that must not depend on data: the
cluster probe (one training step on every worker) and the GPU rehearsal (make gpu-check).

A sample is one random image that the preset's AnyRes layout cuts into a ``grid`` of crops (2x2: 5
SigLIP views) and a detection exchange lengthened with random text tokens to exactly ``text_len``
text tokens, in the real token layout (visual tokens, the inserted "with <adv> suspicious
features: ", anomaly tokens). Batches are deterministic per (rank, position), so a resumed loader
hands out the batches an uninterrupted one would.

Only torch, numpy, Pillow and the model package are imported here (the GPU benchmark imports it
on machines without the training stack); the task class is built on demand.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from aov_dist.model.layout import crop_grid
from aov_dist.model.tokenizer import DETECTION_PROMPT

GRID = (2, 2)


def synthetic_sample(processor: Any, vocab_size: int, text_len: int, seed: int = 0,
                     grid: tuple[int, int] = GRID) -> dict[str, torch.Tensor]:
    """One encoded sample (processor.encode_conversation's keys) of exactly ``text_len`` text tokens."""
    layout = processor.layout
    height, width = layout.image_size * grid[0], layout.image_size * grid[1]
    if crop_grid(layout, height, width) != grid:
        raise RuntimeError(f"a {height}x{width} image gives grid {crop_grid(layout, height, width)}, expected {grid}")
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    conversation = [{"from": "human", "value": f"<image>\n{DETECTION_PROMPT}"}, {"from": "gpt", "value": "Yes."}]
    sample = processor.encode_conversation([image], conversation, max_length=1 << 20, sample_id=f"synthetic-{seed}")
    have = int((sample["token_type"] == 0).sum())
    if text_len < have:
        raise ValueError(f"text_len {text_len}: the chat layout alone holds {have} text tokens; use at least {have}")
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, vocab_size, (text_len - have,), generator=gen)
    sample["input_ids"] = torch.cat([sample["input_ids"], extra])
    sample["labels"] = torch.cat([sample["labels"], extra])  # random targets: the loss has work to do
    sample["token_type"] = torch.cat([sample["token_type"], torch.zeros(len(extra), dtype=sample["token_type"].dtype)])
    return sample


class SyntheticBatches:
    """A resumable loader (the loop's loader protocol) of ``micro``-sample synthetic batches."""

    def __init__(self, processor: Any, vocab_size: int, micro: int, text_len: int, rank: int,
                 per_epoch: int = 10**6):
        self.processor, self.vocab_size, self.micro, self.text_len = processor, vocab_size, micro, text_len
        self.rank, self.batches_per_epoch = rank, per_epoch
        self.epoch, self.position = 0, 0
        self.skipped: dict[str, int] = {}

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        sample = synthetic_sample(self.processor, self.vocab_size, self.text_len, seed=1_000_003 * self.rank + position)
        return self.processor.collate([sample] * self.micro)

    def __iter__(self):
        while self.position < self.batches_per_epoch:
            self.position += 1
            yield self.batch(self.position - 1)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


def synthetic_stage2_task(text_len: int):
    """The real stage-2 task (model, loss) reading SyntheticBatches instead of shards."""
    from aov_dist.model.presets import preset_dims
    from aov_dist.train.tasks import Stage2Task

    class SyntheticStage2(Stage2Task):
        def build_loader(self, cfg, processor, rank, world):
            vocab = preset_dims(cfg.model.preset, cfg.model.overrides)["vocab_size"] or len(processor.tokenizer)
            return SyntheticBatches(processor, vocab, cfg.data.micro_batch_size, text_len, rank)

    return SyntheticStage2()
