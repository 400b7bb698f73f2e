"""The goodput ledger: what each step really computed, per micro-batch on the host, summed over
ranks with the step's one all-reduce and logged to MLflow.

A padded batch spends compute on padding; a packed one on little or none. Tokens/s alone hides
that (it counts real tokens and says nothing of the rest), so the ledger keeps text tokens, image
tokens (the visual, adverb and anomaly positions), padding, samples and the model FLOPs of the
real work (model/flops.py: the same matmuls torch's flop counter sees, attention per sample),
from which MFU follows on GPUs.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Any, Optional

import torch

from aov_dist.model.flops import batch_shape, training_flops


@dataclass
class Goodput:
    text_tokens: float = 0
    image_tokens: float = 0
    padding_tokens: float = 0
    samples: float = 0
    model_flops: float = 0

    def __add__(self, other: "Goodput") -> "Goodput":
        return Goodput(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def as_list(self) -> list[float]:
        return [float(x) for x in astuple(self)]

    @classmethod
    def from_list(cls, values) -> "Goodput":
        return cls(*(float(v) for v in values[:len(fields(cls))]))

    @property
    def real_tokens(self) -> float:
        return self.text_tokens + self.image_tokens

    @property
    def padding_fraction(self) -> float:
        laid_out = self.real_tokens + self.padding_tokens
        return self.padding_tokens / laid_out if laid_out else 0.0


class GoodputCounter:
    """Counts host batches of one job (its model's shapes and what its stage trains)."""

    def __init__(self, model_config: Any, stage: str, train_vision_tower: bool):
        self.model_config, self.stage, self.train_vision_tower = model_config, stage, train_vision_tower

    def __call__(self, batch: dict[str, torch.Tensor]) -> Goodput:
        # batch_shape is the one reading of a batch's samples (padded or packed)
        shape = batch_shape(batch, self.model_config.vision_dummy_for_text_only)
        flops = training_flops(self.model_config, shape, self.stage, self.train_vision_tower)
        if "input_ids" not in batch:  # stage 1: images only
            return Goodput(samples=len(batch["image_labels"]), model_flops=flops)
        real = sum(shape.sample_lengths)
        image = int((batch["token_type"] != 0).sum())
        return Goodput(text_tokens=real - image, image_tokens=image, padding_tokens=batch["input_ids"].numel() - real,
                       samples=len(shape.sample_lengths), model_flops=flops)


def goodput_metrics(total: Goodput, elapsed_s: float, world: int, peak_flops_per_device: float,
                    use_gpu: bool) -> dict[str, float]:
    """A step's ledger (all ranks) as MLflow metrics; ``mfu`` on GPUs with a known peak only (a CPU
    has no meaningful peak to divide by)."""
    metrics = {
        "goodput/text_tokens": total.text_tokens,
        "goodput/image_tokens": total.image_tokens,
        "goodput/padding_fraction": total.padding_fraction,
        "goodput/samples": total.samples,
        "goodput/model_flops": total.model_flops,
        "tokens_per_s": total.real_tokens / elapsed_s,
        "samples_per_s": total.samples / elapsed_s,
    }
    mfu = _mfu(total.model_flops, elapsed_s, world, peak_flops_per_device, use_gpu)
    if mfu is not None:
        metrics["mfu"] = mfu
    return metrics


def _mfu(flops: float, elapsed_s: float, world: int, peak: float, use_gpu: bool) -> Optional[float]:
    if not (use_gpu and peak > 0 and flops > 0 and elapsed_s > 0):
        return None
    return flops / elapsed_s / (peak * world)
