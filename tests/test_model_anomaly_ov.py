"""The tiny Anomaly-OV: splice, counts, forward/backward, generate, save/load, stages."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from aov_dist.model import ModelConfig, build_model
from aov_dist.model.anomaly_ov import SpliceError
from aov_dist.model.layout import crop_grid, num_anomaly_tokens, num_visual_tokens
from aov_dist.model.tokenizer import ADVERBS, DETECTION_PROMPT

DETECT = [{"from": "human", "value": "<image>\n" + DETECTION_PROMPT}, {"from": "gpt", "value": "Yes"}]
MULTI = [{"from": "human", "value": "<image><image>\nAny defect?"}, {"from": "gpt", "value": "No"}]


@pytest.fixture(scope="module")
def built():
    model, proc = build_model(ModelConfig(preset="tiny"))
    return model.eval(), proc


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def mixed_batch(proc):
    a = proc.encode_conversation([image(112, 224)], DETECT, 4096, label=1)  # 1x2 crops
    b = proc.encode_conversation([image(300, 200, 1)], DETECT, 4096, label=0)  # 3x2 crops
    mv = proc.encode_conversation([image(112, 112, 2), image(90, 140, 3)], MULTI, 4096, label=0)
    return proc.collate([a, b, mv])


class Capture:
    """Records the inputs_embeds the language model receives."""

    def __init__(self, model):
        self.embeds = None
        self.handle = model.model.language_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.embeds = kwargs["inputs_embeds"].detach().clone()


def force_scores(model, scores):
    def hook(module, args, out):
        return out._replace(scores=torch.tensor(scores))

    return model.expert.register_forward_hook(hook)


def test_splice_embeddings_exact(built):
    model, proc = built
    batch = mixed_batch(proc)
    forced = [0.1, 0.5, 0.95, 0.3]  # slightly, moderately, highly, moderately (0.3 is the boundary)
    cap, handle = Capture(model), force_scores(model, forced)
    try:
        with torch.no_grad():
            model(**batch)
            exp = model.expert_forward(batch["pixel_values"], batch["image_grids"])
            proj = model.model.multi_modal_projector
            # Visual tokens: what transformers' own LLaVA-OV image path packs (batch_num_images: 1, 1, 2).
            hf = model.model.get_image_features(
                batch["pixel_values"], batch["image_sizes"], batch_num_images=torch.tensor([1, 1, 2])
            ).pooler_output
    finally:
        cap.handle.remove()
        handle.remove()
    embeds, types, ids = cap.embeds, batch["token_type"], batch["input_ids"]
    table = model.get_input_embeddings().weight
    assert torch.equal(embeds[types == 1], torch.cat(hf))
    adverb_ids = [proc.adverb_token_ids[i] for i in (0, 1, 2, 1)]
    assert torch.equal(embeds[types == 2], table[adverb_ids])
    assert torch.equal(embeds[types == 0], table[ids[types == 0]])
    # Anomaly tokens, assembled independently: r(I), base 4, then rows of the 2r x 2c grid + newline.
    tokens, r_img, newline = proj(exp.tokens), proj(exp.image_tokens)[:, 0], model.model.image_newline
    expected, view = [], 0
    for i, (rows, cols) in enumerate(batch["image_grids"].tolist()):
        expected += [r_img[i], *tokens[view]]
        if rows == 0:
            expected.append(newline)
            view += 1
            continue
        crops = tokens[view + 1 : view + 1 + rows * cols].reshape(rows, cols, 2, 2, -1)
        for y in range(2 * rows):
            expected += [crops[y // 2, x // 2, y % 2, x % 2] for x in range(2 * cols)] + [newline]
        view += 1 + rows * cols
    assert len(expected) == sum(num_anomaly_tokens(tuple(g)) for g in batch["image_grids"].tolist())
    torch.testing.assert_close(embeds[types == 3], torch.stack(expected), rtol=0, atol=1e-6)


def test_adverb_thresholds(built):
    model, proc = built
    ids = model.adverb_ids(torch.tensor([0.0, 0.2999, 0.3, 0.6999, 0.7, 1.0]))
    a = proc.adverb_token_ids
    assert ids.tolist() == [a[0], a[0], a[1], a[1], a[2], a[2]]
    assert proc.tokenizer.decode(a) == " " + " ".join(ADVERBS)


def test_saved_adverb_thresholds_win_unless_overridden(tmp_path):
    """A model trained with other thresholds is evaluated with them (ModelConfig default None)."""
    model, proc = build_model(ModelConfig(preset="tiny", adverb_thresholds=[0.5, 0.5]))
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    reloaded, _ = build_model(ModelConfig(pretrained_path=str(tmp_path)))
    a = proc.adverb_token_ids
    assert reloaded.adverb_ids(torch.tensor([0.3, 0.49, 0.5, 0.69])).tolist() == [a[0], a[0], a[2], a[2]]
    overridden, _ = build_model(ModelConfig(pretrained_path=str(tmp_path), adverb_thresholds=[0.3, 0.7]))
    assert overridden.adverb_ids(torch.tensor([0.3, 0.49, 0.5, 0.69])).tolist() == [a[1]] * 4


@pytest.mark.parametrize(
    "size", [(112, 112), (112, 224), (224, 112), (300, 200), (448, 448), (50, 400), (400, 50), (333, 222), (60, 60), (700, 1000)]
)
def test_token_counts_equal_produced_features(built, size):
    model, proc = built
    enc = proc.encode_images([image(*size)])
    grid = tuple(enc.image_grids[0].tolist())
    assert grid == crop_grid(proc.layout, *size)
    with torch.no_grad():
        features, exp, idx = model._vision(enc.pixel_values, enc.image_grids)
        visual, anomaly = model._image_sequences(features, exp, idx, enc.image_sizes)
    assert visual[0].shape[0] == num_visual_tokens(proc.layout, grid, *size)
    assert anomaly[0].shape[0] == num_anomaly_tokens(grid)


def test_forward_backward_outputs(built):
    model, proc = built
    batch = mixed_batch(proc)
    model.train()
    try:
        out = model(**batch)
        out.loss.backward()
    finally:
        model.eval()
    assert out.expert_scores.shape == (4,) and out.expert_logits.shape == (4,)
    torch.testing.assert_close(out.expert_scores, torch.sigmoid(out.expert_logits))
    assert torch.isfinite(out.loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.expert.q_former.query_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_reserved_position_mismatch_is_a_clear_error(built):
    model, proc = built
    batch = mixed_batch(proc)
    batch["token_type"] = batch["token_type"].clone()
    batch["token_type"][0, batch["token_type"][0].tolist().index(1)] = 0
    with pytest.raises(SpliceError, match="visual positions"):
        with torch.no_grad():
            model(**batch)


def test_text_only_batch_runs_vision_with_zero_effect(built):
    model, proc = built
    conv = [{"from": "human", "value": "Describe a screw."}, {"from": "gpt", "value": "It is metal."}]
    batch = proc.collate([proc.encode_conversation([], conv, 512)])
    out = model(**batch)
    out.loss.backward()
    grads = [p.grad for p in model.expert.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # ran (ZeRO-3 sees it), contributed nothing
    model.zero_grad(set_to_none=True)
    model.config.vision_dummy_for_text_only = False
    try:
        with torch.no_grad():
            plain = model(**batch)
    finally:
        model.config.vision_dummy_for_text_only = True
    assert torch.equal(out.loss.detach(), plain.loss)


def test_generate_equals_manual_greedy(built):
    model, proc = built
    prompts = [
        proc.encode_prompt([image(112, 224)], [{"role": "user", "content": "<image>\n" + DETECTION_PROMPT}]),
        proc.encode_prompt([image(112, 112, 1), image(112, 112, 2)], [{"from": "human", "value": "<image><image>\nDefect?"}]),
    ]
    for prompt in prompts:
        batch = proc.collate([prompt], padding_side="left")
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=5, do_sample=False)[0, batch["input_ids"].shape[1] :]
            ids, types = batch["input_ids"], batch["token_type"]
            manual = []
            for _ in range(5):
                logits = model(input_ids=ids, token_type=types, pixel_values=batch["pixel_values"],
                               image_grids=batch["image_grids"], image_sizes=batch["image_sizes"]).logits
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                manual.append(int(nxt))
                ids, types = torch.cat([ids, nxt], 1), torch.cat([types, torch.zeros_like(nxt, dtype=types.dtype)], 1)
                if manual[-1] == proc.tokenizer.eos_token_id:
                    break
        assert generated.tolist()[: len(manual)] == manual


def test_save_load_gives_identical_logits_and_scores(built, tmp_path):
    model, proc = built
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again, proc2 = build_model(ModelConfig(preset="tiny", pretrained_path=str(tmp_path)))
    again.eval()
    assert type(again.config).__name__ == "AnomalyOVConfig" and again.config.adverb_token_ids == proc.adverb_token_ids
    batch = {k: v for k, v in mixed_batch(proc2).items() if k != "labels"}
    with torch.no_grad():
        a, b = model(**batch), again(**batch)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.expert_scores, b.expert_scores)


def test_stock_llava_onevision_checkpoint_plus_expert_file(built, tmp_path):
    model, proc = built
    stock_cfg = LlavaOnevisionConfig(**{k: v for k, v in model.config.to_dict().items() if not k.startswith("expert_")
                                        and k not in ("adverb_thresholds", "adverb_token_ids", "vision_dummy_for_text_only", "model_type")})
    stock = LlavaOnevisionForConditionalGeneration(stock_cfg)
    stock.save_pretrained(tmp_path / "ov")
    proc.tokenizer.save_pretrained(tmp_path / "ov")
    proc.image_processor.save_pretrained(tmp_path / "ov")  # no aov_processor.json: layout from config.json
    torch.save(model.expert.state_dict(), tmp_path / "expert.pth")
    cfg = ModelConfig(pretrained_path=str(tmp_path / "ov"), expert_path=str(tmp_path / "expert.pth"),
                      overrides={"expert_embed_dim": model.config.expert_embed_dim})
    loaded, proc2 = build_model(cfg)
    assert proc2.layout == proc.layout
    theirs = stock.state_dict()
    for key, value in loaded.state_dict().items():  # every stock weight loaded (renamed legacy keys included)
        if not key.startswith("expert."):
            assert torch.equal(value, theirs[key]), key
    for key, value in model.expert.state_dict().items():
        assert torch.equal(loaded.expert.state_dict()[key], value), key


def test_stage_parameter_groups(built):
    model, _ = built
    try:
        g1 = model.stage_parameter_groups("stage1")
        assert list(g1) == ["expert"]
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"expert"} and len(g1["expert"]) == len(list(model.expert.parameters()))
        g2 = model.stage_parameter_groups(2)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any(n.startswith(("expert.", "model.vision_tower.")) for n in names)
        assert "model.image_newline" in names and "lm_head.weight" in names
        assert any(n.startswith("model.multi_modal_projector.") for n in names)
        assert sum(len(v) for v in g2.values()) == len(names)
        with pytest.raises(ValueError, match="unknown stage 'stage3'"):
            model.stage_parameter_groups("stage3")
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
