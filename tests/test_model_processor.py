"""Tiny tokenizer, token layout and AnomalyOVProcessor (no model needed)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from aov_dist.model.layout import VisionLayout, crop_grid, num_anomaly_tokens, num_visual_tokens
from aov_dist.model.presets import grid_pinpoints, tiny_processor
from aov_dist.model.processor import IGNORE_INDEX, AnomalyOVProcessor, ImageTokensExceedMaxLength
from aov_dist.model.tokenizer import ADVERBS, DETECTION_PROMPT, build_tiny_tokenizer

OFFICIAL = VisionLayout(384, 14, tuple(tuple(p) for p in grid_pinpoints(384, 6)))
DETECT = [{"from": "human", "value": "<image>\n" + DETECTION_PROMPT}, {"from": "gpt", "value": "Yes"}]


@pytest.fixture(scope="module")
def proc() -> AnomalyOVProcessor:
    return tiny_processor()


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------ tokenizer
def test_tiny_tokenizer_adverbs_are_single_tokens_and_build_is_deterministic():
    tok = build_tiny_tokenizer()
    for adverb in ADVERBS:
        assert len(tok.encode(" " + adverb, add_special_tokens=False)) == 1
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()
    assert tok.decode(tok.encode(DETECTION_PROMPT, add_special_tokens=False)) == DETECTION_PROMPT


def test_single_token_check_rejects_a_tokenizer_that_splits_an_adverb():
    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="'zyxwv' encodes to"):
        AnomalyOVProcessor(tok, tiny_processor().image_processor, tiny_processor().layout, adverbs=("zyxwv", "highly", "slightly"))


def test_text_only_encoding_equals_the_chat_template(proc):
    conv = [{"from": "human", "value": "Describe the object."}, {"from": "gpt", "value": "A small metal screw."}]
    enc = proc.encode_conversation([], conv, max_length=512)
    messages = [{"role": "user", "content": conv[0]["value"]}, {"role": "assistant", "content": conv[1]["value"]}]
    expected = proc.tokenizer.apply_chat_template(messages, tokenize=False)
    assert enc["input_ids"].tolist() == proc.tokenizer.encode(expected, add_special_tokens=False)
    # labels: exactly the assistant content + <|im_end|>
    labelled = enc["input_ids"][enc["labels"] != IGNORE_INDEX].tolist()
    assert labelled == proc.tokenizer.encode("A small metal screw.<|im_end|>", add_special_tokens=False)
    assert enc["pixel_values"].shape == (0, 3, 112, 112) and enc["image_grids"].shape == (0, 2)


# --------------------------------------------------------------------- layout
@pytest.mark.parametrize("grid,expected", [((1, 1), 11), ((1, 2), 15), ((2, 3), 33), ((6, 6), 161), ((0, 0), 6)])
def test_anomaly_token_count(grid, expected):
    assert num_anomaly_tokens(grid) == expected  # 1 + 4 + 2h(2w+1); single view 6


def _hf_count(layout: VisionLayout, h: int, w: int) -> int:
    """transformers' processor-side formula (independent of the model's packing code we reuse)."""
    fake = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=[list(p) for p in layout.grid_pinpoints]),
        num_image_tokens=layout.grid**2,
        vision_aspect_ratio=layout.vision_aspect_ratio,
    )
    fake._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(fake, *a)
    return LlavaOnevisionProcessor._get_number_of_features(fake, h, w, layout.image_size, layout.image_size)


@pytest.mark.parametrize(
    "size", [(384, 384), (480, 640), (640, 480), (1080, 1920), (300, 2000), (2000, 300), (1500, 1500), (999, 1234), (50, 4000)]
)
def test_visual_token_count_matches_transformers_formula_official(size):
    h, w = size
    assert num_visual_tokens(OFFICIAL, crop_grid(OFFICIAL, h, w), h, w) == _hf_count(OFFICIAL, h, w)


def test_visual_token_count_single_view_and_known_value():
    assert num_visual_tokens(OFFICIAL, (0, 0), 500, 300) == 730
    # 384x384 -> 1x1 crop: 729 base + 27x27 crop + 27 newlines
    assert num_visual_tokens(OFFICIAL, (1, 1), 384, 384) == 729 + 729 + 27


# ------------------------------------------------------------------ splicing
def test_splice_positions_and_labels_for_mixed_batch(proc):
    p = proc
    a = p.encode_conversation([image(112, 224)], DETECT, 4096, label=1)  # grid 1x2
    b = p.encode_conversation([image(300, 200, 1)], DETECT, 4096, label=0)  # grid 3x2
    mv_conv = [{"from": "human", "value": "<image><image>\nAny defect?"}, {"from": "gpt", "value": "No"}]
    mv = p.encode_conversation([image(112, 112, 2), image(90, 140, 3)], mv_conv, 4096, label=0)
    assert a["image_grids"].tolist() == [[1, 2]] and b["image_grids"].tolist() == [[3, 2]]
    assert mv["image_grids"].tolist() == [[0, 0], [0, 0]] and mv["pixel_values"].shape[0] == 2
    prefix = p.tokenizer.encode("with", add_special_tokens=False)
    for enc, grids in ((a, [(1, 2)]), (b, [(3, 2)]), (mv, [(0, 0), (0, 0)])):
        ids, types, labels = enc["input_ids"].tolist(), enc["token_type"].tolist(), enc["labels"].tolist()
        start = ids.index(p.tokenizer.convert_tokens_to_ids("<|im_start|>"), 1)  # the user turn
        pos = start + len(p.tokenizer.encode("<|im_start|>user\n", add_special_tokens=False))
        for (grid, (h, w)) in zip(grids, enc["image_sizes"].tolist()):
            n_vis = num_visual_tokens(p.layout, grid, h, w)
            assert types[pos : pos + n_vis] == [1] * n_vis
            pos += n_vis
            for adverb in ADVERBS:  # the inserted text equals the tokenizer's encoding with the slot filled
                text = p.tokenizer.encode(f"with {adverb} suspicious features: ", add_special_tokens=False)
                filled = [p.adverb_token_ids[ADVERBS.index(adverb)] if t == 2 else i for i, t in zip(ids[pos : pos + len(text)], types[pos : pos + len(text)])]
                assert filled == text
            assert ids[pos : pos + len(prefix)] == prefix
            n_text = len(p.tokenizer.encode("with highly suspicious features: ", add_special_tokens=False))
            assert types[pos : pos + n_text].count(2) == 1
            pos += n_text
            n_anom = num_anomaly_tokens(grid)
            assert types[pos : pos + n_anom] == [3] * n_anom and types[pos + n_anom] != 3
            pos += n_anom
        image_positions = [i for i, t in enumerate(types) if t != 0]
        assert all(labels[i] == IGNORE_INDEX for i in image_positions)
        assert all(ids[i] == p.pad_id for i in image_positions)
    batch = p.collate([a, b, mv])
    assert batch["pixel_values"].shape[0] == 3 + 7 + 2
    assert batch["image_grids"].tolist() == [[1, 2], [3, 2], [0, 0], [0, 0]]
    assert batch["image_labels"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert batch["token_type"].dtype == torch.int8 and batch["input_ids"].shape == batch["labels"].shape
    assert batch["attention_mask"].sum(1).tolist() == [len(a["input_ids"]), len(b["input_ids"]), len(mv["input_ids"])]


def test_left_padding_keeps_tokens_at_the_end(proc):
    short = proc.encode_prompt([], [{"role": "user", "content": "hi"}])
    long = proc.encode_prompt([image(112, 112)], [{"role": "user", "content": "<image>\nAny defect?"}])
    batch = proc.collate([short, long], padding_side="left")
    n = len(short["input_ids"])
    assert batch["input_ids"][0, -n:].tolist() == short["input_ids"].tolist()
    assert batch["attention_mask"][0].tolist() == [0] * (batch["input_ids"].shape[1] - n) + [1] * n
    assert proc.tokenizer.decode(long["input_ids"][-3:]).endswith("<|im_start|>assistant\n")


def test_truncation_never_cuts_image_tokens(proc):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * 200}]
    full = proc.encode_conversation([image(112, 112)], conv, 10_000)
    image_end = max(i for i, t in enumerate(full["token_type"].tolist()) if t != 0) + 1
    cut = proc.encode_conversation([image(112, 112)], conv, image_end + 5)
    assert len(cut["input_ids"]) == image_end + 5
    assert cut["input_ids"].tolist() == full["input_ids"][: image_end + 5].tolist()
    with pytest.raises(ImageTokensExceedMaxLength, match="'rec-7'.*max_length=100") as err:
        proc.encode_conversation([image(112, 112)], conv, 100, sample_id="rec-7")
    assert err.value.needed > 100


def test_placeholder_count_mismatch_names_the_sample(proc):
    with pytest.raises(ValueError, match="'x1': 1 <image> placeholders for 2 images"):
        proc.encode_conversation([image(112, 112), image(112, 112)], DETECT, 4096, sample_id="x1")


def test_processor_save_load_roundtrip(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    again = AnomalyOVProcessor.from_pretrained(tmp_path)
    enc1 = proc.encode_conversation([image(200, 120)], DETECT, 4096)
    enc2 = again.encode_conversation([image(200, 120)], DETECT, 4096)
    for key in enc1:
        assert torch.equal(enc1[key], enc2[key]), key
    assert again.layout == proc.layout and again.adverb_token_ids == proc.adverb_token_ids
