"""Matmul FLOPs of one training micro-batch, from shapes alone (no model, no tensors).

The count is what torch.utils.flop_counter.FlopCounterMode reports for the model's real forward +
backward with attention computed as matmuls (eager, or SDPA's math kernel): 2*m*k*n per matmul
(mm/addmm/bmm/baddbmm and the patch convolution), nothing for norms, activations, softmax or
embedding lookups. The goodput ledger divides it by step time for MFU, so it counts the model's
work, not the layout's:
  * attention is counted per sample (packed samples attend only within themselves) over all
    s x s pairs (the counter ignores causality too); padding is not counted at all;
  * an attention backward is the 4 matmuls autograd runs for the math kernel. The counter's
    formula for fused SDPA kernels (efficient/flash, on GPUs) adds a 5th (recomputing the scores):
    a rematerialization, which model FLOPs exclude (as they exclude activation checkpointing).
FlashAttention-2's own kernels are invisible to the counter; this count does not depend on them.

Backward: for y = x @ W autograd computes dW only if W needs a gradient and dx only if x does,
each as costly as the forward. So a frozen module costs its forward only, and the first trained
matmul on frozen features (the projector's linear_1, the expert's adaptors in stage 1) skips dx.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .loss import IGNORE_INDEX



@dataclass(frozen=True)
class BatchShape:
    sample_lengths: tuple[int, ...]  # real tokens of each sample (each attends only within itself)
    label_positions: int  # positions whose NEXT token has a label: the LM head runs only there (loss.py)
    views: int  # vision views through the tower (a text-only batch runs one dummy view)
    images: int  # images (one expert image token r(I) each; a dummy view counts as 1 image)


class Cost(NamedTuple):
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an [m, k] @ [k, n] matmul, as the flop counter counts them."""
    return 2 * m * k * n


def _cost(ops: list[tuple[int, int]], train: bool) -> Cost:
    """ops: (forward FLOPs of a matmul, how many of its two operands need a gradient). Each
    gradient is one matmul as large as the forward; a module that does not train has none."""
    return Cost(sum(f for f, _ in ops), sum(f * g for f, g in ops) if train else 0)


def _grid_tokens(config) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


# ---------------------------------------------------------------- components
def vision_tower_flops(config, views: int, train: bool = False) -> Cost:
    """SigLIP over every view. Trained (stage 1 with train_vision_tower), the gradient reaches
    the layers up to the deepest one the expert reads; the patch conv gets no grad-input (pixels)."""
    v = config.vision_config
    d, t, rows = v.hidden_size, _grid_tokens(config), views * _grid_tokens(config)
    deepest = max([*config.expert_level_layers, config.expert_last_layer])  # hidden_states index
    layer = [(_mm(rows, d, 4 * d), 2),  # q, k, v, out_proj
             (_mm(rows, d, 2 * v.intermediate_size), 2),  # fc1 + fc2
             (views * 2 * _mm(t, d, t), 2)]  # q @ k^T and p @ v, all heads: 4 t^2 d per view
    patch = _cost([(_mm(rows, v.num_channels * v.patch_size**2, d), 1)], train)
    costs = [patch] + [_cost(layer, train and i < deepest) for i in range(v.num_hidden_layers)]
    return Cost(sum(c.forward for c in costs), sum(c.backward for c in costs))


def expert_flops(config, views: int, images: int, train: bool = False, tower_trains: bool = False) -> Cost:
    """The LTFM expert (expert.py), op by op. Its inputs (tower features) need a gradient only when
    the tower trains: otherwise the ops that read them directly get the weight-side gradient only."""
    e = config.expert_dims()
    d, k, t, q, levels = e.vision_dim, e.embed_dim, e.num_tokens, e.num_queries, e.num_levels
    x = 1 + int(tower_trains)  # gradients of an op whose other operand is a tower feature
    ops = [
        (_mm(images * d, t, 1), x),  # pooling_layer over each image's base view
        (_mm(images, d, k) + _mm(images, k, k), 2),  # class_predictor
        (levels * _mm(2 * images, 2 * k, k), 2),  # prompt_adaptors, on (e+, class) and (e-, class)
        (levels * _mm(views * t, d, k), x),  # siglip_adaptors
        (levels * _mm(views * t, k, 2), 2),  # cosines of every token to (d+, d-)
        (_mm(views * q, t, d), x),  # m-weighted pooling of the features into queries
        (_mm(views * q, d, k), 2),  # q_former.query_proj
        (_mm(views * t, d, k), x),  # q_former.key_proj
        (_mm(views * q, k, t), 2),  # q @ k^T
        (_mm(views * q, t, d), x),  # softmax @ features
        (_mm(images, d, k) + _mm(images, k, 1), 2),  # final_predictor
    ]
    return _cost(ops, train)


def projector_flops(config, views: int, images: int, train: bool = True) -> Cost:
    """linear_1 + linear_2 over every view's tokens, every view's pool^2 anomaly tokens and r(I)
    (all of them, also those the AnyRes unpadding drops later). linear_1 reads frozen features."""
    d_in = config.vision_config.hidden_size * (1 if isinstance(config.vision_feature_layer, int)
                                               else len(config.vision_feature_layer))
    h = config.text_config.hidden_size
    rows = views * (_grid_tokens(config) + config.expert_pool**2) + images
    return _cost([(_mm(rows, d_in, h), 1), (_mm(rows, h, h), 2)], train)


def llm_flops(config, sample_lengths: tuple[int, ...], train: bool = True) -> Cost:
    """Qwen2 decoder layers: every linear on every real token, attention per sample. Both gradients
    everywhere: the embeddings train, so even layer 0's input needs one."""
    c = config.text_config
    h, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or h // heads
    tokens = sum(sample_lengths)
    linear = _mm(tokens, h, (heads + 2 * kv) * hd) + _mm(tokens, heads * hd, h) + _mm(tokens, h, 3 * c.intermediate_size)
    attention = sum(heads * 2 * _mm(s, hd, s) for s in sample_lengths)  # GQA: keys repeated per query head
    return _cost([(c.num_hidden_layers * linear, 2), (c.num_hidden_layers * attention, 2)], train)


def lm_head_flops(config, label_positions: int, train: bool = True) -> Cost:
    c = config.text_config
    return _cost([(_mm(label_positions, c.hidden_size, c.vocab_size), 2)], train)


# ---------------------------------------------------------------- the batch
def flops_breakdown(config, shape: BatchShape, stage: str = "stage2", train_vision_tower: bool = False) -> dict[str, Cost]:
    """Per component, as AnomalyOVForConditionalGeneration.stage_parameter_groups trains them."""
    if stage in ("stage1", 1):  # vision tower + expert (model.expert_forward), the expert trains
        return {"vision_tower": vision_tower_flops(config, shape.views, train=train_vision_tower),
                "expert": expert_flops(config, shape.views, shape.images, train=True, tower_trains=train_vision_tower)}
    if stage not in ("stage2", 2):
        raise ValueError(f"training_flops: unknown stage {stage!r} (expected 'stage1' or 'stage2')")
    # stage 2: projector (+ image_newline) and LLM + LM head train; tower and expert run forward only
    return {"vision_tower": vision_tower_flops(config, shape.views),
            "expert": expert_flops(config, shape.views, shape.images),
            "projector": projector_flops(config, shape.views, shape.images),
            "llm": llm_flops(config, shape.sample_lengths),
            "lm_head": lm_head_flops(config, shape.label_positions)}


def training_flops(config, shape: BatchShape, stage: str = "stage2", train_vision_tower: bool = False) -> int:
    """Matmul FLOPs of one forward + backward of a micro-batch (see the module docstring)."""
    return sum(c.total for c in flops_breakdown(config, shape, stage, train_vision_tower).values())


def batch_shape(batch: dict, vision_dummy_for_text_only: bool = True) -> BatchShape:
    """The shape of a collated processor batch (collate or collate_packed; stage 1 has no text)."""
    pixels, grids = batch.get("pixel_values"), batch.get("image_grids")
    views = 0 if pixels is None else int(pixels.shape[0])
    images = 0 if grids is None else int(grids.shape[0])
    if "input_ids" not in batch:
        return BatchShape((), 0, views, images)
    if views == 0 and vision_dummy_for_text_only and "token_type" in batch:
        views, images = 1, 1  # the model's _dummy_vision: one blank view, one image
    lengths = batch.get("sample_lengths")
    if lengths is None:  # padded: one sample per row
        lengths = batch["attention_mask"].sum(dim=1)
    labels = batch["labels"]
    return BatchShape(tuple(int(n) for n in lengths.tolist()), int((labels[:, 1:] != IGNORE_INDEX).sum()), views, images)
