"""Token layout of one image in the LLM sequence (architecture.md §3), computed without a model.

Per image: visual tokens (LLaVA-OneVision packing), the text "with <adv> suspicious features: ",
then the anomaly tokens. The visual count is obtained by running transformers' own
`LlavaOnevisionModel.pack_image_features` (unpad + anyres_max downsampling + newlines) on a
1-channel dummy, so the count at tokenization time is by construction the number of features the
model packs: no re-derived formula that could drift from transformers' code.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

# (0, 0): a single view without crops (each image of a multi-view sample).
SINGLE_VIEW = (0, 0)


@dataclass(frozen=True)
class VisionLayout:
    """What the processor needs to know about the vision side to lay out tokens."""

    image_size: int  # crop / base view side in pixels (384 for SigLIP-so400m)
    patch_size: int  # 14
    grid_pinpoints: tuple[tuple[int, int], ...]  # AnyRes candidate resolutions (height, width)
    vision_aspect_ratio: str = "anyres_max_9"
    pool: int = 2  # expert: pool x pool anomaly tokens per view

    @property
    def grid(self) -> int:
        """Tokens per side of one view (27)."""
        return self.image_size // self.patch_size


def crop_grid(layout: VisionLayout, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of AnyRes crops for an image of this size (same choice as the image processor)."""
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in layout.grid_pinpoints])
    return best_h // layout.image_size, best_w // layout.image_size


def num_views(grid: tuple[int, int]) -> int:
    rows, cols = grid
    return 1 if (rows, cols) == SINGLE_VIEW else 1 + rows * cols


def num_visual_tokens(layout: VisionLayout, grid: tuple[int, int], height: int, width: int) -> int:
    """Visual tokens of one image: base view + unpadded crops with one newline per row (AnyRes), or
    the single view + one newline."""
    if tuple(grid) == SINGLE_VIEW:
        return layout.grid**2 + 1
    return _packed_length(layout, int(grid[0]), int(grid[1]), int(height), int(width))


@functools.lru_cache(maxsize=4096)
def _packed_length(layout: VisionLayout, rows: int, cols: int, height: int, width: int) -> int:
    g = layout.grid
    dummy = torch.zeros(1 + rows * cols, g * g, 1)
    fake_self = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=layout.image_size, patch_size=layout.patch_size),
            image_grid_pinpoints=[list(p) for p in layout.grid_pinpoints],
        )
    )
    packed, lengths = LlavaOnevisionModel.pack_image_features(
        fake_self, [dummy], torch.tensor([[height, width]]), torch.zeros(1), layout.vision_aspect_ratio
    )
    return int(lengths[0])


def num_anomaly_tokens(grid: tuple[int, int], pool: int = 2) -> int:
    """r(I) + the base view's pool^2 tokens + the crops as a (pool*rows) x (pool*cols) grid with a
    newline per row: 1 + 4 + 2h(2w+1) for pool 2; a single view: r(I) + 4 + one newline = 6."""
    rows, cols = grid
    if (rows, cols) == SINGLE_VIEW:
        return 1 + pool * pool + 1
    return 1 + pool * pool + pool * rows * (pool * cols + 1)
