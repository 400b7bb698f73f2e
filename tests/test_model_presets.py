"""Official presets on the meta device, attention selection, config errors, FA2 vs SDPA on GPU."""
from __future__ import annotations

import pytest
import torch

from aov_dist.model import ModelConfig, build_model
from aov_dist.model.attention import flash_attn_available, resolve_attn_implementation
from aov_dist.model.hf_config import AnomalyOVConfig
from aov_dist.model.presets import build_config, meta_model


@pytest.mark.parametrize("preset,hidden,layers,vocab", [("aov_0.5b", 896, 24, 152000), ("aov_7b", 3584, 28, 152128)])
def test_official_presets_have_official_shapes(preset, hidden, layers, vocab):
    model = meta_model(preset)
    tower = model.model.vision_tower
    assert tower.config.hidden_size == 1152 and len(tower.encoder.layers) == 26
    assert tower.embeddings.position_embedding.weight.shape == (729, 1152)
    assert model.model.language_model.embed_tokens.weight.shape == (vocab, hidden)
    assert len(model.model.language_model.layers) == layers
    assert model.model.multi_modal_projector.linear_1.weight.shape == (hidden, 1152)
    assert model.model.image_newline.shape == (hidden,)
    assert model.config.expert_level_layers == [7, 13, 19, 25] and model.config.expert_last_layer == 26
    shapes = {k: tuple(v.shape) for k, v in model.expert.state_dict().items()}
    assert shapes["pooling_layer.0.weight"] == (1, 729)
    assert shapes["prompt_adaptors.3.weight"] == (512, 1024)
    assert shapes["q_former.key_proj.weight"] == (512, 1152)
    assert shapes["final_predictor.2.weight"] == (1, 512)
    n_expert = sum(p.numel() for p in model.expert.parameters())
    assert 7.0e6 < n_expert < 7.2e6  # "about 7.1 M parameters"


def test_tiny_levels_are_proportional_and_configurable():
    cfg = build_config("tiny", {"vocab_size": 100})
    assert cfg.expert_level_layers == [1, 2, 3, 4] and cfg.expert_last_layer == 4
    custom = build_config("tiny", {"vocab_size": 100}, expert_level_layers=[0, 1, 2, 3], expert_last_layer=3)
    assert custom.expert_level_layers == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="expert layer index 9 out of range for a 4-layer vision tower"):
        build_config("tiny", {"vocab_size": 100}, expert_level_layers=[1, 2, 3, 9])


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="model.preset must be one of"):
        build_config("aov_13b")
    with pytest.raises(ValueError, match=r"unknown keys \['text_layerz'\]"):
        build_model(ModelConfig(overrides={"text_layerz": 2}))
    with pytest.raises(ValueError, match="needs model.pretrained_path"):
        build_model(ModelConfig(preset="aov_7b"))
    with pytest.raises(ValueError, match="adverb_thresholds"):
        build_config("tiny", {"vocab_size": 100}, adverb_thresholds=[0.8, 0.2])


def test_config_roundtrip_keeps_expert_fields():
    cfg = build_config("tiny", {"vocab_size": 100}, adverb_token_ids=[5, 6, 7], adverb_thresholds=[0.2, 0.8])
    again = AnomalyOVConfig.from_dict(cfg.to_dict())
    assert again.adverb_token_ids == [5, 6, 7] and again.adverb_thresholds == [0.2, 0.8]
    assert again.expert_embed_dim == 64 and again.model_type == "anomaly_ov"


def test_resolve_attn_implementation():
    expected = "flash_attention_2" if flash_attn_available() else "sdpa"
    assert resolve_attn_implementation("auto") == expected
    assert resolve_attn_implementation("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="one of"):
        resolve_attn_implementation("flash3")
    if not flash_attn_available():
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            resolve_attn_implementation("flash_attention_2")


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs CUDA and flash-attn")
def test_flash_attention_matches_sdpa_in_bf16():
    import numpy as np
    from PIL import Image

    sdpa, proc = build_model(ModelConfig(attn_implementation="sdpa", dtype="bf16"))
    fa2, _ = build_model(ModelConfig(attn_implementation="flash_attention_2", dtype="bf16"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    conv = [{"from": "human", "value": "<image>\nAny defect?"}, {"from": "gpt", "value": "Yes"}]
    encoded = proc.encode_conversation([img], conv, 4096)
    batch = {k: v.cuda() for k, v in proc.collate([encoded]).items() if k != "labels"}
    with torch.no_grad():
        a = sdpa.cuda().eval()(**batch)
        b = fa2.cuda().eval()(**batch)
    torch.testing.assert_close(b.logits.float(), a.logits.float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(b.expert_scores.float(), a.expert_scores.float(), atol=1e-2, rtol=1e-2)
