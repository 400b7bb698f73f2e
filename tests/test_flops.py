"""model/flops.py against torch's FlopCounterMode on the tiny model's real forward + backward.

CPU SDPA kernels are invisible to the flop counter, so the counted runs use SDPA's math kernel,
which computes attention as matmuls: what flops.py counts (see its docstring).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aov_dist.model import ModelConfig, build_model
from aov_dist.model.flops import BatchShape, batch_shape, flops_breakdown, llm_flops, lm_head_flops, training_flops
from aov_dist.model.flops import vision_tower_flops
from aov_dist.model.presets import meta_model
from aov_dist.train.tasks import balanced_bce

QUESTION = "Is there a defect?"
ANSWER = {"from": "gpt", "value": "Yes, a scratch at the top left."}
# flops.py component -> the module the counter attributes it to
MODULES = {"vision_tower": "model.vision_tower", "expert": "expert", "projector": "model.multi_modal_projector",
           "llm": "model.language_model", "lm_head": "lm_head"}


@pytest.fixture(scope="module")
def built():
    return build_model(ModelConfig(preset="tiny", dtype="fp32"))


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def sample(proc, images):
    human = {"from": "human", "value": "<image>" * len(images) + ("\n" if images else "") + QUESTION}
    return proc.encode_conversation(images, [human, ANSWER], 4096, label=1)


def count(model, loss_fn, grad: bool = True) -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(grad):
        loss = loss_fn()
        if grad:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter


def module_counts(counter: FlopCounterMode) -> dict[str, int]:
    counts = counter.get_flop_counts()
    return {k: sum(counts.get(f"AnomalyOVForConditionalGeneration.{m}", {}).values()) for k, m in MODULES.items()}


def explain(counter: FlopCounterMode, breakdown) -> str:
    """Which part differs: expected (forward, backward) per component next to what the counter
    attributes to its module (in a backward pass the counter's module tracker may attribute an
    op to two modules, e.g. the projector's backward also to the language model)."""
    got = module_counts(counter)
    rows = [f"  {k}: expected {c.forward} + {c.backward} = {c.total}, counter's module {got[k]}" for k, c in breakdown.items()]
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return "\n".join([f"counted {counter.get_total_flops()} by op {ops}", *rows])


def assert_stage2_exact(model, batch):
    model.stage_parameter_groups("stage2")
    shape = batch_shape(batch, model.config.vision_dummy_for_text_only)
    counter = count(model, lambda: model(**batch).loss)
    expected = training_flops(model.config, shape, "stage2")
    assert counter.get_total_flops() == expected, explain(counter, flops_breakdown(model.config, shape, "stage2"))
    return shape


def test_single_image_stage2_sample_counts_exactly_what_the_flop_counter_sees(built):
    model, proc = built
    batch = proc.collate([sample(proc, [image(112, 224)])])  # AnyRes: base view + 1x2 crops
    shape = assert_stage2_exact(model, batch)
    assert (shape.views, shape.images, len(shape.sample_lengths)) == (3, 1, 1)


def test_multi_image_sample_counts_one_view_per_image(built):
    model, proc = built
    batch = proc.collate([sample(proc, [image(112, 224), image(90, 140, 1)])])
    shape = assert_stage2_exact(model, batch)
    assert (shape.views, shape.images) == (2, 2)


@pytest.mark.parametrize("dummy", [True, False], ids=["dummy_view", "no_dummy_view"])
def test_text_only_sample_counts_the_dummy_view_when_the_model_runs_it(built, monkeypatch, dummy):
    model, proc = built
    monkeypatch.setattr(model.config, "vision_dummy_for_text_only", dummy)
    shape = assert_stage2_exact(model, proc.collate([sample(proc, [])]))
    assert (shape.views, shape.images) == ((1, 1) if dummy else (0, 0))


@pytest.mark.parametrize("train_tower", [False, True], ids=["frozen_tower", "trained_tower"])
def test_stage1_batch_counts_expert_and_tower_gradients_exactly(built, train_tower):
    model, proc = built
    batch = proc.collate([proc.encode_expert_sample([image(112, 224)], 1), proc.encode_expert_sample([image(300, 200, 2)], 0)])
    model.stage_parameter_groups("stage1", train_vision_tower=train_tower)
    shape = batch_shape(batch)
    assert shape == BatchShape((), 0, int(batch["pixel_values"].shape[0]), 2)
    counter = count(model, lambda: balanced_bce(model.expert_forward(batch["pixel_values"], batch["image_grids"]).logits,
                                                batch["image_labels"]))
    breakdown = flops_breakdown(model.config, shape, "stage1", train_tower)
    assert counter.get_total_flops() == training_flops(model.config, shape, "stage1", train_tower), explain(counter, breakdown)


def test_forward_flops_of_each_component_match_its_module(built):
    """Without gradients the counter's per-module attribution is exact: each component alone."""
    model, proc = built
    batch = proc.collate([sample(proc, [image(300, 200)])])
    counter = count(model, lambda: model(**batch).loss, grad=False)
    breakdown = flops_breakdown(model.config, batch_shape(batch), "stage2")
    assert module_counts(counter) == {k: c.forward for k, c in breakdown.items()}, explain(counter, breakdown)


def test_batch_shape_reads_padded_packed_and_stage1_batches(built):
    model, proc = built
    a, b = sample(proc, [image(112, 224)]), sample(proc, [])
    padded, packed = proc.collate([a, b]), proc.collate_packed([a, b], max_length=4096, one_row=True)
    labels = lambda s: int((s["labels"][1:] != -100).sum())  # noqa: E731
    expected = BatchShape((len(a["input_ids"]), len(b["input_ids"])), labels(a) + labels(b), 3, 1)
    assert batch_shape(padded) == batch_shape(packed) == expected
    # a batch with an image runs no dummy view: the text-only sample alone is counted without one
    alone = [training_flops(model.config, batch_shape(proc.collate([s]), False)) for s in (a, b)]
    assert training_flops(model.config, expected) == sum(alone)  # attention per sample: no cross-sample pairs
    stage1 = proc.collate([proc.encode_expert_sample([image(112, 112)], 0)])  # base view + 1x1 crop
    assert batch_shape(stage1) == BatchShape((), 0, 2, 1)


@pytest.mark.parametrize("preset", ["aov_0.5b", "aov_7b"])
def test_real_presets_follow_the_6N_rule(preset):
    """LLM: 6 * N * S + 12 * L * (heads * head_dim) * S^2 (PaLM's estimate: forward + backward of
    every weight, attention over all S^2 pairs); N = decoder parameters (biases and norms too, a
    hair above the matmul weights). LM head: 6 * vocab * hidden per label position. Vision tower,
    forward only: 2 * N_tower * V * T + 4 * L_v * D_v * T^2 * V."""
    model = meta_model(preset)
    cfg, text, vision = model.config, model.config.text_config, model.config.vision_config
    tokens, labels, views = 8000, 300, 10
    shape = BatchShape((tokens,), labels, views, 1)
    n_llm = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    rule = 6 * n_llm * tokens + 12 * text.num_hidden_layers * width * tokens**2
    assert llm_flops(cfg, shape.sample_lengths).total == pytest.approx(rule, rel=0.02)
    assert lm_head_flops(cfg, labels).total == 6 * text.vocab_size * text.hidden_size * labels
    t = (vision.image_size // vision.patch_size) ** 2
    n_tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    tower_rule = 2 * n_tower * views * t + 4 * vision.num_hidden_layers * vision.hidden_size * t * t * views
    assert vision_tower_flops(cfg, views) == (pytest.approx(tower_rule, rel=0.02), 0)
    breakdown = flops_breakdown(cfg, shape, "stage2")
    # the LLM dominates; the frozen tower and expert, run forward only, are the next largest
    assert breakdown["llm"].total > breakdown["vision_tower"].total > breakdown["projector"].total
    assert training_flops(cfg, shape) == sum(c.total for c in breakdown.values())
