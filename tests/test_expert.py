"""The LTFM anomaly expert: released layout, values against the written-out formula, numerics, weights I/O."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from aov_dist.model.expert import (
    AnomalyExpert,
    ExpertDims,
    ExpertWeightsError,
    load_expert_weights,
    official_expert_dims,
    pooling_bins,
)

TINY = ExpertDims(vision_dim=12, grid=5, embed_dim=8, pool=2, num_levels=4, logit_scale=100.0)

# The keys and shapes of the released pretrained_expert_{05b,7b}.pth.
OFFICIAL_SHAPES = {
    "positive_embedding": (1, 512),
    "negative_embedding": (1, 512),
    "pooling_layer.0.weight": (1, 729),
    "pooling_layer.0.bias": (1,),
    "class_predictor.0.weight": (512, 1152),
    "class_predictor.0.bias": (512,),
    "class_predictor.2.weight": (512, 512),
    "class_predictor.2.bias": (512,),
    **{f"siglip_adaptors.{i}.weight": (512, 1152) for i in range(4)},
    **{f"siglip_adaptors.{i}.bias": (512,) for i in range(4)},
    **{f"prompt_adaptors.{i}.weight": (512, 1024) for i in range(4)},
    **{f"prompt_adaptors.{i}.bias": (512,) for i in range(4)},
    "final_predictor.0.weight": (512, 1152),
    "final_predictor.0.bias": (512,),
    "final_predictor.2.weight": (1, 512),
    "final_predictor.2.bias": (1,),
    "q_former.query_proj.weight": (512, 1152),
    "q_former.query_proj.bias": (512,),
    "q_former.key_proj.weight": (512, 1152),
    "q_former.key_proj.bias": (512,),
}


def reference(p: dict, last, levels, image_index, is_base, num_images, dims: ExpertDims) -> dict:
    """The paper's formulas with plain ops, one image / view at a time (float64 in the tests)."""

    def linear(x, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    def gelu(x):  # exact (erf) GELU
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    g, q = dims.grid, dims.pool
    class_vec = {}
    for img in range(num_images):
        base = [v for v in range(len(image_index)) if image_index[v] == img and is_base[v]][0]
        pooled = linear(last[base].T, "pooling_layer.0")[:, 0]  # [D]
        class_vec[img] = linear(gelu(linear(pooled, "class_predictor.0")), "class_predictor.2")
    maps, tokens, weights = [], [], []
    for v in range(last.shape[0]):
        c = class_vec[int(image_index[v])]
        level_maps = []
        for i in range(dims.num_levels):
            d_pos = linear(torch.cat([p["positive_embedding"][0], c]), f"prompt_adaptors.{i}")
            d_neg = linear(torch.cat([p["negative_embedding"][0], c]), f"prompt_adaptors.{i}")
            d = torch.stack([d_pos / d_pos.norm(), d_neg / d_neg.norm()], dim=1)  # [E, 2]
            f = linear(levels[i][v], f"siglip_adaptors.{i}")
            f = f / f.norm(dim=-1, keepdim=True)
            level_maps.append(torch.softmax(dims.logit_scale * f @ d, dim=-1)[:, 1])
        m = sum(level_maps) / len(level_maps)  # [T]
        m_img = m.reshape(1, 1, g, g)
        x_img = last[v].T.reshape(1, -1, g, g)
        cell_m = torch.nn.functional.adaptive_avg_pool2d(m_img, q)  # [1, 1, q, q]
        query = torch.nn.functional.adaptive_avg_pool2d(x_img * m_img, q) / cell_m  # [1, D, q, q]
        query = query.reshape(-1, q * q).T  # [Q, D] row-major cells
        attn = linear(query, "q_former.query_proj") @ linear(last[v], "q_former.key_proj").T
        tok = torch.softmax(attn / math.sqrt(dims.embed_dim), dim=-1) @ last[v]
        maps.append(m.reshape(g, g))
        tokens.append(tok)
        weights.append(cell_m.reshape(q * q) * m.mean())
    r = []
    for img in range(num_images):
        vs = [v for v in range(last.shape[0]) if image_index[v] == img]
        num = sum((weights[v][:, None] * tokens[v]).sum(0) for v in vs)
        den = sum(weights[v].sum() for v in vs)
        r.append(num / den)
    r = torch.stack(r)
    logits = linear(gelu(linear(r, "final_predictor.0")), "final_predictor.2")[:, 0]
    return {
        "tokens": torch.stack(tokens),
        "image_tokens": r[:, None],
        "logits": logits,
        "scores": torch.sigmoid(logits),
        "maps": torch.stack(maps),
        "view_significance": torch.stack([m.mean() for m in maps]),
    }


def make_inputs(dims: ExpertDims, num_views: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_views, dims.grid * dims.grid, dims.vision_dim)
    last = torch.randn(shape, generator=gen, dtype=dtype)
    levels = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(dims.num_levels)]
    return last, levels


def make_expert(dims: ExpertDims = TINY, seed: int = 0, dtype=torch.float64) -> AnomalyExpert:
    torch.manual_seed(seed)
    expert = AnomalyExpert(dims).to(dtype)
    # Larger adaptor weights than the default init, so the maps are far from 0.5 and differ per token.
    with torch.no_grad():
        for p in expert.parameters():
            p.mul_(3.0)
    return expert


# Views in a deliberately mixed order: image 0 = views 1 (base), 0, 3; image 1 = view 2 (single view).
IMAGE_INDEX = torch.tensor([0, 0, 1, 0])
IS_BASE = torch.tensor([False, True, True, False])


def state(expert: AnomalyExpert) -> dict:
    return {k: v.detach().clone() for k, v in expert.state_dict().items()}


def test_official_parameter_count_and_state_dict_layout():
    with torch.device("meta"):
        expert = AnomalyExpert(official_expert_dims())
    assert sum(p.numel() for p in expert.parameters()) == 7_086_811
    assert {k: tuple(v.shape) for k, v in expert.state_dict().items()} == OFFICIAL_SHAPES
    assert isinstance(expert.class_predictor[1], torch.nn.GELU)
    assert isinstance(expert.final_predictor[1], torch.nn.GELU)
    assert official_expert_dims() == ExpertDims()


def test_pooling_cells_match_adaptive_avg_pool_including_overlap():
    cells = pooling_bins(27, 2)
    rows_of_cell0 = sorted({t // 27 for t in cells[0].nonzero().flatten().tolist()})
    assert rows_of_cell0 == list(range(14))  # 27 -> 2: cells [0, 14) and [13, 27) share row 13
    x = torch.randn(1, 1, 27, 27, dtype=torch.float64)
    ours = (cells.double() @ x.reshape(729)) / cells.sum(-1)
    assert torch.allclose(ours, torch.nn.functional.adaptive_avg_pool2d(x, 2).reshape(4))


@pytest.mark.parametrize(
    "dims",
    [TINY, ExpertDims(vision_dim=6, grid=4, embed_dim=4, pool=2), ExpertDims(vision_dim=8, grid=27, embed_dim=4)],
)
def test_matches_reference_formula(dims):
    expert = make_expert(dims)
    last, levels = make_inputs(dims, num_views=4)
    out = expert(last, levels, IMAGE_INDEX, IS_BASE, num_images=2)
    ref = reference(state(expert), last, levels, IMAGE_INDEX, IS_BASE, 2, dims)
    for name, want in ref.items():
        got = getattr(out, name)
        assert got.shape == want.shape, name
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-9), name
    # The maps are non-trivial (otherwise the re-weighting would not be exercised).
    assert out.maps.std() > 0.05


def test_float32_matches_float64_reference():
    expert = make_expert(TINY)
    last, levels = make_inputs(TINY, num_views=4)
    ref = reference(state(expert), last, levels, IMAGE_INDEX, IS_BASE, 2, TINY)
    out = expert.float()(last.float(), [lv.float() for lv in levels], IMAGE_INDEX, IS_BASE, num_images=2)
    assert torch.allclose(out.logits.double(), ref["logits"], rtol=1e-4, atol=1e-4)
    assert torch.allclose(out.tokens.double(), ref["tokens"], rtol=1e-4, atol=1e-4)


def aligned_expert_and_inputs(dims: ExpertDims):
    """An expert whose significance underflows where a level's first features point along +u.

    siglip adaptors take the first embed_dim features, prompt adaptors take e± only, e+ = u and
    e- = -u: a token with features u has cos = +1 with d+ and -1 with d-, so 100*cos differs by 200
    and m = sigmoid(-200) ~ 1e-87 (0 in float32, fine in float64).
    """
    e, d = dims.embed_dim, dims.vision_dim
    expert = make_expert(dims)
    u = torch.zeros(e, dtype=torch.float64)
    u[0] = 1.0
    with torch.no_grad():
        expert.positive_embedding.copy_(u[None])
        expert.negative_embedding.copy_(-u[None])
        for adaptor in expert.siglip_adaptors:
            adaptor.weight.zero_()
            adaptor.weight[:, :e] = torch.eye(e)
            adaptor.bias.zero_()
        for adaptor in expert.prompt_adaptors:
            adaptor.weight.zero_()
            adaptor.weight[:, :e] = torch.eye(e)
            adaptor.bias.zero_()
    last, levels = make_inputs(dims, num_views=4, seed=1)
    g = dims.grid
    top_left = [y * g + x for y in range(g // 2) for x in range(g // 2)]  # exactly cell 0 (grid 4)
    for level in levels:
        level[0, top_left, :e] = 10.0 * u  # view 0 (a crop of image 0): cell 0 underflows
        level[2, :, :e] = 10.0 * u  # view 2 (image 1, its only view): everything underflows
    return expert, last, levels


def test_near_zero_significance_is_finite_and_equals_the_formula():
    dims = ExpertDims(vision_dim=6, grid=4, embed_dim=4, pool=2)
    expert, last, levels = aligned_expert_and_inputs(dims)
    ref = reference(state(expert), last, levels, IMAGE_INDEX, IS_BASE, 2, dims)  # float64: no underflow
    assert ref["maps"][2].max() < 1e-80 and ref["maps"][0, 0, 0] < 1e-80
    # The literal formula in float32 is 0/0 here: this is the case the module must survive.
    naive = reference({k: v.float() for k, v in state(expert).items()}, last.float(),
                      [lv.float() for lv in levels], IMAGE_INDEX, IS_BASE, 2, dims)
    assert torch.isnan(naive["tokens"]).any() and torch.isnan(naive["logits"][1])

    expert = expert.float()
    last32 = last.float().requires_grad_()
    out = expert(last32, [lv.float() for lv in levels], IMAGE_INDEX, IS_BASE, num_images=2)
    for name, want in ref.items():
        got = getattr(out, name)
        assert torch.isfinite(got).all(), name
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), name
    out.logits.sum().backward()
    assert torch.isfinite(last32.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in expert.parameters() if p.grad is not None)


def test_crops_use_their_base_views_class_vector():
    expert = make_expert(TINY)
    last, levels = make_inputs(TINY, num_views=4)
    before = expert(last, levels, IMAGE_INDEX, IS_BASE, num_images=2)

    crop_changed = last.clone()
    crop_changed[0] += torch.randn_like(crop_changed[0])  # view 0: a crop of image 0
    after = expert(crop_changed, levels, IMAGE_INDEX, IS_BASE, num_images=2)
    assert torch.equal(after.maps, before.maps)  # maps see a crop's last features only via the base
    assert not torch.allclose(after.tokens[0], before.tokens[0])  # (but its tokens do change)

    base_changed = last.clone()
    base_changed[1] += torch.randn_like(base_changed[1])  # view 1: image 0's base view
    after = expert(base_changed, levels, IMAGE_INDEX, IS_BASE, num_images=2)
    assert not torch.allclose(after.maps[0], before.maps[0])  # the crop's map follows its base
    assert not torch.allclose(after.maps[3], before.maps[3])
    assert torch.equal(after.maps[2], before.maps[2])  # image 1 is untouched
    assert torch.equal(after.logits[1], before.logits[1])


@pytest.mark.parametrize(
    "image_index, is_base, message",
    [
        ([0, 0, 1, 0], [True, True, True, False], r"exactly one base view; base views per image: \[2, 1\]"),
        ([0, 0, 1, 0], [False, True, False, False], r"exactly one base view; base views per image: \[1, 0\]"),
        ([0, 0, 2, 0], [False, True, True, False], r"image_index values must lie in \[0, 2\)"),
    ],
)
def test_bad_view_layout_is_refused(image_index, is_base, message):
    expert = make_expert(TINY)
    last, levels = make_inputs(TINY, num_views=4)
    with pytest.raises(ValueError, match=message):
        expert(last, levels, torch.tensor(image_index), torch.tensor(is_base), num_images=2)


def test_wrong_number_of_levels_is_refused():
    expert = make_expert(TINY)
    last, levels = make_inputs(TINY, num_views=4)
    with pytest.raises(ValueError, match="expected 4 feature levels, got 3"):
        expert(last, levels[:3], IMAGE_INDEX, IS_BASE, num_images=2)


def test_load_round_trip_from_pth_and_s3_url(tmp_path, s3_bucket):
    source = make_expert(TINY, seed=1, dtype=torch.float32)
    path = tmp_path / "pretrained_expert_tiny.pth"
    torch.save(source.state_dict(), path)
    last, levels = make_inputs(TINY, num_views=4, dtype=torch.float32)
    want = source(last, levels, IMAGE_INDEX, IS_BASE, num_images=2)

    target = make_expert(TINY, seed=2, dtype=torch.float32)
    assert not torch.equal(target(last, levels, IMAGE_INDEX, IS_BASE, 2).logits, want.logits)
    load_expert_weights(target, path)
    assert torch.equal(target(last, levels, IMAGE_INDEX, IS_BASE, 2).logits, want.logits)

    from aov_dist import storage  # the released file read from s3:// (the loopback S3 server)

    storage.write_bytes(f"{s3_bucket}/weights/expert.pth", path.read_bytes())
    other = make_expert(TINY, seed=3, dtype=torch.float32)
    load_expert_weights(other, f"{s3_bucket}/weights/expert.pth")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), source.state_dict().values()))

    third = make_expert(TINY, seed=4, dtype=torch.float32)
    load_expert_weights(third, source.state_dict())  # a state dict works too
    assert torch.equal(third.q_former.key_proj.weight, source.q_former.key_proj.weight)


def test_mismatched_weights_name_every_problem_and_the_file(tmp_path):
    sd = make_expert(TINY, dtype=torch.float32).state_dict()
    del sd["q_former.key_proj.bias"]
    sd["class_predictor.1.weight"] = torch.zeros(3)
    sd["pooling_layer.0.weight"] = torch.zeros(1, 729)
    path = tmp_path / "pretrained_expert_7b.pth"
    torch.save(sd, path)
    expert = make_expert(TINY, dtype=torch.float32)
    before = expert.state_dict()["pooling_layer.0.weight"].clone()
    with pytest.raises(ExpertWeightsError) as info:
        load_expert_weights(expert, path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in msg
    assert "missing keys: q_former.key_proj.bias" in msg
    assert "unexpected keys: class_predictor.1.weight" in msg
    assert "shape mismatches: pooling_layer.0.weight (expected [1, 25], got [1, 729])" in msg
    assert torch.equal(expert.state_dict()["pooling_layer.0.weight"], before)  # nothing half-loaded


_UNPICKLED = []


def _record_unpickling() -> list:
    _UNPICKLED.append(True)
    return []


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"positive_embedding": _Payload()}, f, protocol=2)
    with pytest.raises(ExpertWeightsError, match=r"evil\.pth: refused to load"):
        load_expert_weights(make_expert(TINY), path)
    assert _UNPICKLED == []  # the payload never ran
