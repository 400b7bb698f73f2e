"""The Anomaly-OV anomaly expert: Look-Twice Feature Matching (LTFM, Xu et al., CVPR 2025).

Input per view (base view + crops of every image): the last-layer SigLIP features and
`num_levels` intermediate levels, all [V, grid*grid, vision_dim]. Output: four anomaly tokens
per view, one image token r(I) per image, the image anomaly logit/score and the significance maps.

The parameter names and shapes are those of the released `pretrained_expert_{05b,7b}.pth`
(a plain state dict), so those files load unchanged with `load_expert_weights`.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExpertWeightsError(ValueError):
    """An expert weight file / state dict that does not fit the expert exactly."""


@dataclass(frozen=True)
class ExpertDims:
    vision_dim: int = 1152  # SigLIP width D
    grid: int = 27  # tokens per view = grid*grid (729)
    embed_dim: int = 512  # e±, class vector, adaptor outputs, attention width, predictor hidden
    pool: int = 2  # 2x2 pooled -> 4 query tokens per view
    num_levels: int = 4
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        for name in ("vision_dim", "grid", "embed_dim", "pool", "num_levels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ExpertDims.{name} must be a positive int, got {value!r}")
        if self.pool > self.grid:
            raise ValueError(f"ExpertDims.pool ({self.pool}) must not exceed ExpertDims.grid ({self.grid})")

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def num_queries(self) -> int:
        return self.pool * self.pool


def official_expert_dims() -> ExpertDims:
    """The dimensions of the released experts (SigLIP-so400m at 384 px)."""
    return ExpertDims(vision_dim=1152, grid=27, embed_dim=512, pool=2, num_levels=4, logit_scale=100.0)


class ExpertOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 must see the tensors a module returns to
    re-gather that module's partitioned parameters for its backward pass."""

    tokens: Tensor  # [V, pool*pool, D] anomaly tokens per view
    image_tokens: Tensor  # [I, 1, D] r(I)
    logits: Tensor  # [I] pre-sigmoid image anomaly logit
    scores: Tensor  # [I] sigmoid(logits)
    maps: Tensor  # [V, grid, grid] averaged abnormal significance map m (float32, or float64 for float64 input)
    view_significance: Tensor  # [V] mean(m) (same dtype as maps)


@functools.lru_cache(maxsize=16)
def pooling_bins(grid: int, pool: int, device: torch.device | str = "cpu") -> Tensor:
    """[pool*pool, grid*grid] bool: which tokens fall in each cell of the pool x pool grid.

    Same cells as nn.AdaptiveAvgPool2d (which the released expert was trained with): cell i spans
    [floor(i*grid/pool), ceil((i+1)*grid/pool)). For 27 -> 2 the cells overlap (rows/cols 0..13
    and 13..26 share row/col 13). Cells are ordered row-major, like the official token order.
    """
    spans = [(i * grid // pool, -((-(i + 1) * grid) // pool)) for i in range(pool)]
    line = torch.zeros(pool, grid, dtype=torch.bool, device="cpu")
    for i, (start, end) in enumerate(spans):
        line[i, start:end] = True
    # cell (r, c) holds token (y, x) iff row r covers y and column c covers x.
    cells = line[:, None, :, None] & line[None, :, None, :]  # [pool, pool, grid, grid]
    return cells.reshape(pool * pool, grid * grid).to(device)


class QueryAttention(nn.Module):
    """Single-head cross-attention: queries/keys projected to embed_dim, values are the raw features."""

    def __init__(self, vision_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(vision_dim, embed_dim)
        self.key_proj = nn.Linear(vision_dim, embed_dim)

    def forward(self, queries: Tensor, features: Tensor) -> Tensor:
        q = self.query_proj(queries)  # [V, Q, E]
        k = self.key_proj(features)  # [V, T, E]
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])
        return scores.softmax(dim=-1) @ features  # [V, Q, D]


class AnomalyExpert(nn.Module):
    def __init__(self, dims: ExpertDims = ExpertDims()) -> None:
        super().__init__()
        self.dims = dims
        d, e, t, n = dims.vision_dim, dims.embed_dim, dims.num_tokens, dims.num_levels
        # e+ (normal) and e- (abnormal); randn like the official initialisation.
        self.positive_embedding = nn.Parameter(torch.randn(1, e))
        self.negative_embedding = nn.Parameter(torch.randn(1, e))
        # Sequential wrappers only to reproduce the released key names (pooling_layer.0.*, ...).
        self.pooling_layer = nn.Sequential(nn.Linear(t, 1))
        self.class_predictor = nn.Sequential(nn.Linear(d, e), nn.GELU(), nn.Linear(e, e))
        self.siglip_adaptors = nn.ModuleList(nn.Linear(d, e) for _ in range(n))
        self.prompt_adaptors = nn.ModuleList(nn.Linear(2 * e, e) for _ in range(n))
        self.final_predictor = nn.Sequential(nn.Linear(d, e), nn.GELU(), nn.Linear(e, 1))
        self.q_former = QueryAttention(d, e)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        last: Tensor,
        levels: Sequence[Tensor],
        image_index: Tensor,
        is_base: Tensor,
        num_images: int,
    ) -> ExpertOutput:
        self._check_inputs(last, levels, image_index, is_base, num_images)
        class_vectors = self._class_vectors(last, image_index, is_base, num_images)  # [I, E]
        z = self._abnormal_margins(levels, class_vectors, image_index)  # [V, L, T], >= float32
        # softmax over (normal, abnormal) of 2 logits == sigmoid(abnormal - normal).
        m = torch.sigmoid(z).mean(dim=1)  # [V, T]
        # log m, computed without ever forming m: stays finite when m underflows to 0.
        log_m = torch.logsumexp(F.logsigmoid(z), dim=1) - math.log(z.shape[1])

        queries, log_cell_m = self._reweighted_queries(last, log_m)  # [V, Q, D], [V, Q]
        tokens = self.q_former(queries, last)  # [V, Q, D]

        log_view_sig = torch.logsumexp(log_m, dim=-1) - math.log(log_m.shape[-1])  # log mean(m)
        image_tokens = self._image_tokens(tokens, log_cell_m + log_view_sig[:, None], image_index, num_images)
        logits = self.final_predictor(image_tokens).reshape(num_images)
        v, g = last.shape[0], self.dims.grid
        return ExpertOutput(
            tokens=tokens,
            image_tokens=image_tokens[:, None, :],
            logits=logits,
            scores=torch.sigmoid(logits),
            maps=m.reshape(v, g, g),
            view_significance=m.mean(dim=-1),
        )

    def _class_vectors(self, last: Tensor, image_index: Tensor, is_base: Tensor, num_images: int) -> Tensor:
        """Step 1: one class vector per image, from its base view only (crops reuse it)."""
        views = torch.arange(last.shape[0], device=last.device)
        # Index of each image's base view, found without a host sync (non-base views propose -1).
        base_view = torch.full((num_images,), -1, dtype=torch.long, device=last.device).scatter_reduce(
            0, image_index, torch.where(is_base, views, -1), reduce="amax"
        )
        pooled = self.pooling_layer(last[base_view].transpose(1, 2)).squeeze(-1)  # [I, D]
        return self.class_predictor(pooled)

    def _abnormal_margins(self, levels: Sequence[Tensor], class_vectors: Tensor, image_index: Tensor) -> Tensor:
        """Steps 2-3: per level, scale * (cos(f, d-) - cos(f, d+)) for every token: [V, L, T]."""
        n_img = class_vectors.shape[0]
        pos = self.positive_embedding.expand(n_img, -1)
        neg = self.negative_embedding.expand(n_img, -1)
        margins = []
        for level, siglip_adaptor, prompt_adaptor in zip(levels, self.siglip_adaptors, self.prompt_adaptors):
            # Text side: concat order (e±, class vector), as in the released weights.
            d_pos = F.normalize(prompt_adaptor(torch.cat([pos, class_vectors], dim=-1)), dim=-1)
            d_neg = F.normalize(prompt_adaptor(torch.cat([neg, class_vectors], dim=-1)), dim=-1)
            prompts = torch.stack([d_pos, d_neg], dim=-1)[image_index]  # [V, E, 2]
            f = F.normalize(siglip_adaptor(level), dim=-1)  # [V, T, E]
            # F.normalize divides by max(norm, 1e-12): identical to x/|x| except for a zero vector.
            cos = (self.dims.logit_scale * f) @ prompts  # [V, T, 2]
            # Map arithmetic in at least float32 (bf16 would blur sigmoid/logsumexp); tiny tensors.
            margins.append((cos[..., 1] - cos[..., 0]).to(torch.promote_types(cos.dtype, torch.float32)))
        return torch.stack(margins, dim=1)

    def _reweighted_queries(self, last: Tensor, log_m: Tensor) -> tuple[Tensor, Tensor]:
        """Step 4: avgpool(x * m) / avgpool(m) per cell, and log avgpool(m): [V, Q, D], [V, Q].

        Numerical safety: the paper's ratio is 0/0 = NaN when m underflows to 0 over a whole cell
        (float32 does so once all levels say "normal" by a margin of ~104 logits, well inside the
        +-200 range of 100*cos). The ratio is exactly an m-weighted mean over the cell, i.e.
        softmax over the cell of log m applied to x, which we compute from log m instead: same
        value as the formula wherever the formula is finite (up to rounding), finite everywhere
        else, and no 1/m^2 terms that could overflow in the backward pass. No clamping involved.
        """
        # Not a buffer: the state dict must hold exactly the released keys, and a non-persistent
        # buffer would come out uninitialised from meta-device construction + to_empty().
        bins = pooling_bins(self.dims.grid, self.dims.pool, log_m.device)
        masked = log_m[:, None, :].masked_fill(~bins, float("-inf"))  # [V, Q, T]
        weights = masked.softmax(dim=-1)  # every cell is non-empty, so no all--inf row
        queries = weights.to(last.dtype) @ last
        log_cell_m = torch.logsumexp(masked, dim=-1) - bins.sum(dim=-1).log()
        return queries, log_cell_m

    def _image_tokens(self, tokens: Tensor, log_weights: Tensor, image_index: Tensor, num_images: int) -> Tensor:
        """Step 6: r(I) = sum(w * token) / sum(w) over the views and cells of image I, w = cell m x mean(m).

        Computed as a per-image softmax of log w (shifted by the per-image max, so each image's
        denominator is >= 1): equal to the weighted mean wherever the weights are representable,
        finite when they all underflow. [I, D].
        """
        flat_w = log_weights.reshape(-1)  # [V*Q]
        owner = image_index.repeat_interleave(log_weights.shape[1])  # [V*Q]
        with torch.no_grad():  # the shift cancels in the ratio; no gradient needed through it
            shift = torch.full((num_images,), float("-inf"), device=flat_w.device, dtype=flat_w.dtype)
            shift = shift.scatter_reduce(0, owner, flat_w, reduce="amax")
        w = torch.exp(flat_w - shift[owner])
        flat_tokens = tokens.reshape(-1, tokens.shape[-1]).to(w.dtype)  # sum in >= float32 even under bf16
        num = w.new_zeros(num_images, tokens.shape[-1]).index_add(0, owner, w[:, None] * flat_tokens)
        den = w.new_zeros(num_images).index_add(0, owner, w)
        return (num / den[:, None]).to(tokens.dtype)

    # ------------------------------------------------------------ validation
    def _check_inputs(
        self, last: Tensor, levels: Sequence[Tensor], image_index: Tensor, is_base: Tensor, num_images: int
    ) -> None:
        dims = self.dims
        where = "AnomalyExpert.forward"
        expected = (dims.num_tokens, dims.vision_dim)
        if last.dim() != 3 or tuple(last.shape[1:]) != expected:
            raise ValueError(f"{where}: last must be [V, {expected[0]}, {expected[1]}], got {list(last.shape)}")
        v = last.shape[0]
        if len(levels) != dims.num_levels:
            raise ValueError(f"{where}: expected {dims.num_levels} feature levels, got {len(levels)}")
        for i, level in enumerate(levels):
            if level.shape != last.shape:
                raise ValueError(f"{where}: levels[{i}] is {list(level.shape)}, expected {list(last.shape)}")
        if num_images < 1 or v < 1:
            raise ValueError(f"{where}: need at least one image and one view, got {num_images} and {v}")
        for name, t, dtype in (("image_index", image_index, torch.long), ("is_base", is_base, torch.bool)):
            if t.shape != (v,) or t.dtype != dtype:
                raise ValueError(f"{where}: {name} must be {dtype} [{v}], got {t.dtype} {list(t.shape)}")
        # These two checks cost a host sync each; bad indices would otherwise fail deep inside
        # scatter ops (a device-side assert on CUDA) or silently mix images.
        if not bool(((image_index >= 0) & (image_index < num_images)).all()):
            raise ValueError(f"{where}: image_index values must lie in [0, {num_images}), got {image_index.tolist()}")
        bases = torch.zeros(num_images, dtype=torch.long, device=is_base.device)
        bases = bases.index_add(0, image_index, is_base.long())
        if not bool((bases == 1).all()):
            raise ValueError(
                f"{where}: every image needs exactly one base view; base views per image: {bases.tolist()}"
            )


# ------------------------------------------------------------------ weights
def load_expert_weights(expert: AnomalyExpert, source: str | os.PathLike | Mapping[str, Tensor]) -> None:
    """Load a released `pretrained_expert_*.pth` (or our own export, or a state dict) strictly.

    Files are read with torch.load(weights_only=True): a pickle that holds anything but tensors
    and plain containers is refused rather than executed. Local paths and `s3://...` (aov_dist.storage).
    Nothing is copied unless every key and shape matches. Under ZeRO-3 call this before the
    engine partitions the parameters (or inside deepspeed.zero.GatheredParameters(modifier_rank=0)).
    """
    if isinstance(source, Mapping):
        where, state = "<state dict>", source
    else:
        where = os.fspath(source)
        state = _read_weights(where)
    check_expert_state_dict(expert, state, where)
    expert.load_state_dict(dict(state), strict=True)


def _read_weights(where: str) -> Mapping[str, Tensor]:
    try:
        from aov_dist import storage

        with storage.open_url(where, "rb") as f:
            state = torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise ExpertWeightsError(
            f"expert weights {where}: refused to load (torch.load weights_only=True accepts only tensors "
            f"and plain containers): {err}"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ExpertWeightsError(
            f"expert weights {where}: expected a plain state dict of tensors, got {type(state).__name__}"
        )
    return state


def check_expert_state_dict(expert: AnomalyExpert, state: Mapping[str, Tensor], where: str) -> None:
    """Raise ExpertWeightsError listing every missing key, unexpected key and shape mismatch."""
    # Shapes from the parameters themselves: under ZeRO-3 a partitioned parameter is empty and
    # carries its full shape as ds_shape.
    params = dict(expert.named_parameters())
    own = {k: torch.Size(getattr(params.get(k), "ds_shape", v.shape)) for k, v in expert.state_dict().items()}
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = [
        f"{k} (expected {list(own[k])}, got {list(state[k].shape)})"
        for k in sorted(own)
        if k in state and tuple(state[k].shape) != tuple(own[k])
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append("missing keys: " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("shape mismatches: " + ", ".join(mismatched))
        raise ExpertWeightsError(
            f"expert weights {where} do not match the expert (dims {expert.dims}): " + "; ".join(problems)
        )
