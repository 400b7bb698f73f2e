"""The causal-LM loss with the LM head applied only where a label exists.

Only assistant tokens carry labels, a few hundred of the ~8k positions of an AnyRes sample: the
full logits (positions x vocabulary, then upcast to float32 for the loss) are most of the memory of
a 7B step. Selecting the positions first and applying the head to them gives the same loss (the
mean over labelled targets, as transformers' ForCausalLMLoss) and the same gradients.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def shifted_targets(labels: Tensor) -> Tensor:
    """Target of every position: the next position's label (-100 after the last one)."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def label_positions_loss(hidden: Tensor, labels: Tensor, lm_head: nn.Module) -> Tensor:
    """Mean cross-entropy over the positions whose target is a label; 0 (with zero gradients)
    when a batch has none, where transformers' loss would be NaN.

    The boolean selection reads the mask's count back to the host once per forward (on a GPU a
    sync), which is what lets the head skip every unlabelled position.
    """
    targets = shifted_targets(labels)
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[keep]).float()  # [N, vocabulary]: the only logits this loss makes
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    return total / keep.sum().clamp(min=1)
