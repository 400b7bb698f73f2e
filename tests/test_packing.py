"""Packing: which samples share a row (data/packing.py), the packed collator, and the model's loss
and gradients on packed rows against the same samples unpacked (tiny model, fp32, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aov_dist.data.packing import SampleLongerThanRow, pack_rows, padding_fraction
from aov_dist.model import ModelConfig, build_model
from aov_dist.model.anomaly_ov import HOST_INPUTS
from aov_dist.model.attention import flash_attn_available
from aov_dist.model.processor import IGNORE_INDEX


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ------------------------------------------------------------------ which row
def test_every_sample_lands_in_exactly_one_row_within_max_length():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = [int(x) for x in rng.integers(1, 100, size=int(rng.integers(1, 12)))]
        rows = pack_rows(lengths, 100)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
        assert rows == pack_rows(lengths, 100)  # deterministic


def test_rows_are_balanced_when_first_fit_leaves_a_short_last_row():
    # first-fit decreasing: [60+40], [60+40], [30] -> longest 100, padding 3*100-230 = 70
    lengths = [60, 60, 40, 40, 30]
    rows = pack_rows(lengths, 100)
    assert len(rows) == 3
    assert max(sum(lengths[i] for i in row) for row in rows) < 100
    assert padding_fraction(lengths, rows) < 1 - 230 / 300


def test_a_swap_between_rows_shortens_the_longest_row():
    # least-loaded filling gives rows of 17 and 13; swapping 8 and 6 gives 15 and 15
    lengths = [8, 7, 6, 5, 4]
    rows = pack_rows(lengths, 20)
    assert sorted(sum(lengths[i] for i in row) for row in rows) == [15, 15]


def test_a_sample_of_exactly_max_length_fills_a_row_alone_and_a_longer_one_is_refused():
    assert pack_rows([64, 10, 20], 64) == [[0], [1, 2]]
    with pytest.raises(SampleLongerThanRow, match=r"sample 1 .* 65 tokens.*data.max_length=64"):
        pack_rows([10, 65], 64)


# ---------------------------------------------------------- packed == unpacked
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, proc = build_model(ModelConfig(preset="tiny"))
    model.stage_parameter_groups("stage2")
    return model.eval(), proc


def mixed_samples(proc):
    """Text-only, a single AnyRes image, two images (single views): the modality mix of a batch."""
    single = ([image(112, 224)], turns("<image>\nIs there a defect?", "Yes, a scratch in the top left cell."))
    multi = ([image(112, 112, 1), image(90, 140, 2)], turns("<image><image>\nCompare the two.", "Both are normal."))
    text = ([], turns("What does an anomaly expert do?", "It scores every patch of an image for defects."))
    return [proc.encode_conversation(imgs, conv, 4096, sample_id=str(i))
            for i, (imgs, conv) in enumerate((single, text, multi))]


def loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    return loss.detach(), grads


def token_weighted_reference(model, proc, samples):
    """Each sample alone (no padding at all), weighted by its labelled targets."""
    total, grads, weight = 0.0, 0.0, 0
    for s in samples:
        n = int((s["labels"][1:] != IGNORE_INDEX).sum())
        loss, g = loss_and_grads(model, proc.collate([s]))
        total, grads, weight = total + loss * n, grads + g * n, weight + n
    return total / weight, grads / weight


def test_loss_on_label_positions_equals_the_loss_of_full_logits(tiny):
    model, proc = tiny
    batch = proc.collate(mixed_samples(proc))
    loss, grads = loss_and_grads(model, batch)
    assert model(**batch).logits is None  # a training forward makes no full logits
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.zero_grad(set_to_none=True)
    full = model.loss_function(logits=model(**inputs).logits, labels=batch["labels"],
                               vocab_size=model.config.text_config.vocab_size)
    full.backward()
    full_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    assert abs(float(loss) - float(full.detach())) <= 1e-6 * float(full.detach())
    assert float(torch.nn.functional.cosine_similarity(grads.double(), full_grads.double(), dim=0)) >= 0.999999


@pytest.mark.parametrize("layout", ["rows", "one_row", "padded"])
def test_packed_loss_and_gradients_equal_the_samples_unpacked(tiny, layout):
    model, proc = tiny
    samples = mixed_samples(proc)
    # max_length = the longest sample: it fills a row exactly, the other two share one
    max_length = max(len(s["input_ids"]) for s in samples)
    if layout == "padded":
        batch = proc.collate(samples)
    else:
        batch = proc.collate_packed(samples, max_length, one_row=layout == "one_row")
        assert batch["input_ids"].shape[0] == (1 if layout == "one_row" else 2)
        assert "attention_mask" not in batch
    ref_loss, ref_grads = token_weighted_reference(model, proc, samples)
    loss, grads = loss_and_grads(model, batch)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    assert float(torch.nn.functional.cosine_similarity(grads.double(), ref_grads.double(), dim=0)) >= 0.999999


def test_packed_rows_restart_positions_and_never_predict_across_a_boundary(tiny):
    _, proc = tiny
    samples = mixed_samples(proc)
    lengths = [len(s["input_ids"]) for s in samples]
    batch = proc.collate_packed(samples, sum(lengths))  # all three fit one row
    assert batch["input_ids"].shape == (1, sum(lengths))
    order = batch["sample_lengths"].tolist()
    assert sorted(order) == sorted(lengths)
    starts = np.cumsum([0, *order[:-1]])
    pos = batch["position_ids"][0]
    assert [int(pos[s]) for s in starts] == [0, 0, 0]
    assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)
    # images follow the samples' order: the 2-image sample's grids are the single views (0, 0)
    assert batch["image_grids"].shape[0] == 3


def test_padding_of_a_packed_row_is_its_own_segment_without_labels(tiny):
    _, proc = tiny
    samples = mixed_samples(proc)
    a, b, c = (len(s["input_ids"]) for s in samples)
    assert a > b + c  # the image sample fills row 0 alone; text + two images share row 1
    batch = proc.collate_packed(samples, a)
    assert batch["sample_lengths"].tolist() == [a, b, c]
    assert torch.equal(batch["position_ids"][0], torch.arange(a))
    pad = a - b - c
    assert torch.equal(batch["position_ids"][1], torch.cat([torch.arange(b), torch.arange(c), torch.arange(pad)]))
    assert batch["labels"][1, -pad:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][1, -pad:].eq(proc.pad_id).all()
    assert batch["token_type"][1, -pad:].eq(0).all()


def test_the_goodput_ledger_counts_the_same_work_padded_and_packed_and_the_padding_exactly(tiny):
    from aov_dist.train.goodput import GoodputCounter, goodput_metrics

    model, proc = tiny
    samples = mixed_samples(proc)
    lengths = [len(s["input_ids"]) for s in samples]
    image = sum(int((s["token_type"] != 0).sum()) for s in samples)
    count = GoodputCounter(model.config, "stage2", False)
    padded = count(proc.collate(samples))
    packed = count(proc.collate_packed(samples, max(lengths)))
    for g in (padded, packed):
        assert (g.text_tokens, g.image_tokens, g.samples) == (sum(lengths) - image, image, 3)
        assert g.model_flops > 0
    assert padded.padding_tokens == 3 * max(lengths) - sum(lengths)
    assert packed.padding_tokens == 2 * max(lengths) - sum(lengths)  # 2 rows of the longest sample
    assert packed.model_flops == padded.model_flops  # the real work, not the layout
    m = goodput_metrics(padded + packed, elapsed_s=2.0, world=2, peak_flops_per_device=1e12, use_gpu=True)
    assert m["goodput/samples"] == 6 and m["samples_per_s"] == 3.0
    assert m["tokens_per_s"] == sum(lengths)
    assert m["mfu"] == pytest.approx(2 * padded.model_flops / 2.0 / 2e12)
    assert "mfu" not in goodput_metrics(padded, 1.0, 1, 1e12, use_gpu=False)


# ------------------------------------------- through the loop: 2 ranks, ZeRO-3
@pytest.fixture(scope="module")
def stage2_runs(synthetic_shards, tmp_path_factory):
    """Tiny stage-2 jobs on 2 gloo ranks (ZeRO-3), run lazily and cached by name."""
    from train_harness import run_ranks, tiny_overrides, typed_cfg

    root = tmp_path_factory.mktemp("packing_runs")
    cache: dict[str, list[dict]] = {}

    def run(name: str, *, packing: bool, steps: int = 4, run_name: str = "pk", extra: tuple[str, ...] = ()):
        if name not in cache:
            ov = ["stage=stage2", "stage.require_init=false", "data.max_length=1024", f"data.packing={packing}",
                  "train.checkpoint_every_steps=2", "train.keep_checkpoints=3", *extra]
            cfg = typed_cfg(tiny_overrides(synthetic_shards.manifest_path, root / name, world=2, num_workers=1,
                                           steps=steps, global_batch=8, micro=4, run_name=run_name, extra=ov))
            cache[name] = run_ranks(cfg, root / f"{name}_out", deadline_s=900)
        return cache[name]

    return run


@pytest.mark.slow
def test_a_packed_job_trains_like_the_padded_one_and_counts_its_goodput(stage2_runs):
    from train_harness import assert_states_close, hf_state

    padded = stage2_runs("padded", packing=False)
    packed = stage2_runs("packed", packing=True)
    # same samples per micro-batch, token-weighted loss per micro-batch: the same per-step losses
    assert packed[0]["losses"] == pytest.approx(padded[0]["losses"], rel=1e-5)
    assert packed[0]["skipped"] == padded[0]["skipped"]  # too-long samples: tests/test_faults_stage2_data.py
    assert_states_close(hf_state(packed[0]["checkpoints"][-1]), hf_state(padded[0]["checkpoints"][-1]),
                        rtol=1e-4, atol=1e-5)
    for a, b in zip(padded[0]["metrics"], packed[0]["metrics"]):
        # the same real tokens and samples, laid out with less padding
        for key in ("goodput/text_tokens", "goodput/image_tokens", "goodput/samples"):
            assert a[key] == b[key] and a[key] > 0
        assert b["goodput/padding_fraction"] < a["goodput/padding_fraction"]
        assert a["goodput/samples"] == 8
        assert b["goodput/model_flops"] == a["goodput/model_flops"] > 0


@pytest.mark.slow
def test_a_packed_job_resumed_mid_epoch_equals_the_uninterrupted_one(stage2_runs):
    full = stage2_runs("packed", packing=True)
    first = stage2_runs("packed_first", packing=True, steps=2, run_name="pk-resume")
    step2 = first[0]["checkpoints"][-1]
    resumed = stage2_runs("packed_resumed", packing=True, run_name="pk-resume2",
                          extra=(f"train.resume_from='{step2}'",))
    assert resumed[0]["resumed_from"] == step2
    assert resumed[0]["losses"] == pytest.approx(full[0]["losses"], rel=1e-5)


def test_rows_of_samples_are_refused_under_flash_attention(tiny):
    model, proc = tiny
    samples = mixed_samples(proc)
    batch = proc.collate_packed(samples, max(len(s["input_ids"]) for s in samples))
    assert batch["position_ids"].shape[0] == 2
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="packed batch of 2 rows under flash_attention_2.*one_row=True"):
            model(**batch)
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs CUDA and flash-attn")
def test_one_packed_row_under_flash_attention_trains_like_padded_sdpa_in_bf16():
    sdpa, proc = build_model(ModelConfig(attn_implementation="sdpa", dtype="bf16"))
    fa2, _ = build_model(ModelConfig(attn_implementation="flash_attention_2", dtype="bf16"))
    samples = mixed_samples(proc)
    for model in (sdpa, fa2):
        model.stage_parameter_groups("stage2")
        model.cuda().eval()

    def on_gpu(batch):
        return {k: v if k in HOST_INPUTS else v.cuda() for k, v in batch.items()}

    ref, ref_grads = loss_and_grads(sdpa, on_gpu(proc.collate(samples)))
    loss, grads = loss_and_grads(fa2, on_gpu(proc.collate_packed(samples, 4096, one_row=True)))
    assert abs(float(loss) - float(ref)) <= 2e-2 * abs(float(ref))
    assert float(torch.nn.functional.cosine_similarity(grads.double(), ref_grads.double(), dim=0)) >= 0.99
