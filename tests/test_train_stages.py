"""The two training stages on the tiny model and synthetic shards (one gloo rank in a spawned
process, real DeepSpeed ZeRO-3, no Ray): stage 2's causal-LM loss goes down, starting from a
stage-1 checkpoint as its init source."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_harness import run_ranks, typed_cfg

pytestmark = pytest.mark.slow


def _train(overrides: list[str], out: str) -> dict:
    """run_training on one spawned gloo rank: its losses and checkpoints."""
    (rank0,) = run_ranks(typed_cfg(overrides), out)
    return rank0


def _common(manifest, storage, steps: int) -> list[str]:
    return [f"data.datasets=[{{name: s, manifest: '{manifest}', weight: 1.0}}]", "data.num_workers=0",
            "data.micro_batch_size=4", "stage.global_batch_size=4", f"stage.max_steps={steps}",
            "cluster.workers_per_node=1", "deepspeed.param_persistence_threshold=0",
            f"train.storage_path={storage}", "tracking.enabled=false", f"train.checkpoint_every_steps={steps}"]


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    """240 training records (enough for the expert to generalise a little) and 40 held-out
    benchmark images, 64 px."""
    from aov_dist.data.shards import write_shards
    from aov_dist.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("stage_data")
    res = generate(SynthConfig(out=str(root), seed=0, num_train=240, num_bench=40, image_size=64))
    write_shards([res.train_json], str(root / "shards"), image_root=res.image_root, shard_size_mb=0.5)
    return root


def _auroc(hf_dir: str, bench: str) -> float:
    import torch
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from aov_dist.model import ModelConfig, build_model

    model, processor = build_model(ModelConfig(pretrained_path=hf_dir))
    model.eval()
    records = json.load(open(f"{bench}/detection.json"))
    scores = []
    with torch.no_grad():
        for r in records:
            enc = processor.encode_images([Image.open(f"{bench}/{r['image']}").convert("RGB")])
            scores.append(float(model.expert_forward(enc.pixel_values, enc.image_grids).scores[0]))
    return roc_auc_score([int(r["anomaly"]) for r in records], scores)


def test_stage1_expert_detects_then_stage2_loss_decreases(tmp_path, stage_data):
    """Stage 1 (the tiny preset's random tower trains with the expert; released SigLIP would stay
    frozen) beats chance on held-out images; stage 2 starts from that checkpoint, its LM loss
    falls, and the expert it carries stays exactly as stage 1 left it."""
    import torch

    from aov_dist.model import ModelConfig, build_model

    manifest = stage_data / "shards" / "manifest.json"
    s1 = _train(_common(manifest, tmp_path, 60) + [
        "train.run_name=s1", "data.micro_batch_size=8", "stage.global_batch_size=8", "stage.lr.expert=2e-3",
        "+stage.lr.vision_tower=5e-4", "stage.schedule=warmup_cosine", "stage.warmup_ratio=0.05"],
        str(tmp_path / "s1"))
    stage1_ckpt = s1["checkpoints"][-1]
    auroc = _auroc(f"{stage1_ckpt}/hf", str(stage_data / "benchmark"))
    assert auroc > 0.62, auroc  # measured 0.705 (40 held-out images, 20 anomalous; chance 0.5)
    _assert_partial_export_completes(stage1_ckpt, tmp_path / "stage1_full")

    s2 = _train(_common(manifest, tmp_path, 12) + [
        "stage=stage2", "train.run_name=s2", f"stage.init_from={stage1_ckpt}",
        "stage.lr.projector=2e-3", "stage.lr.llm=2e-3", "stage.warmup_ratio=0.1", "data.max_length=1024"],
        str(tmp_path / "s2"))
    losses = s2["losses"]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # measured: 6.38 -> 5.09 (mean of the first / last 3 steps); batch-to-batch noise is ~0.2
    assert last < first - 0.6, losses
    a = build_model(ModelConfig(pretrained_path=f"{stage1_ckpt}/hf"))[0].state_dict()
    b = build_model(ModelConfig(pretrained_path=f"{s2['checkpoints'][-1]}/hf"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("expert.", "model.vision_tower.")))
    llm = [k for k in a if k.startswith("model.language_model.")]
    assert llm and not all(torch.equal(a[k], b[k]) for k in llm)


def _assert_partial_export_completes(step: str, out) -> None:
    """Stage 1's hf/ holds only what it trained (expert and tiny tower, not the frozen LLM);
    aov-export writes the complete model, equal tensor for tensor to the partial one loaded on its
    base, and a fraction of its size."""
    import torch

    from aov_dist.model import ModelConfig, build_model
    from aov_dist.model.partial import PARTIAL_FILE, WEIGHTS_FILE, is_partial
    from aov_dist.train.export import export

    hf = Path(step, "hf")
    assert is_partial(hf)
    trained = json.loads((hf / PARTIAL_FILE).read_text())["keys"]
    assert trained and all(k.startswith(("expert.", "model.vision_tower.")) for k in trained)
    with pytest.raises(ValueError, match="holds only the weights its stage trained"):
        export(step)  # completing it in place would overwrite the partial folder
    full = Path(export(step, str(out)))
    assert not is_partial(full)
    a = build_model(ModelConfig(pretrained_path=str(hf)))[0].state_dict()
    b = build_model(ModelConfig(pretrained_path=str(full)))[0].state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    assert size(hf) == (hf / WEIGHTS_FILE).stat().st_size < 0.6 * size(full), (size(hf), size(full))


def test_checkpoints_on_s3_commit_and_resume(tmp_path, synthetic_shards, s3_bucket):
    """Every file of a step goes to object storage before the marker; a new job finds the newest
    committed step there (fsspec listing) and continues exactly: the losses of an uninterrupted
    run are those of the interrupted one plus its continuation."""
    from aov_dist.train import checkpoint as ckpt

    base = _common(synthetic_shards.manifest_path, s3_bucket, 2) + ["train.run_name=s3run",
                                                                     "train.export_hf_in_checkpoints=false"]
    part = _train(base, str(tmp_path / "a"))
    assert part["checkpoints"] == [f"{s3_bucket}/s3run/step_2"]
    assert ckpt.latest_committed(s3_bucket, "s3run") == f"{s3_bucket}/s3run/step_2"
    assert ckpt.read_json(f"{s3_bucket}/s3run/step_2/COMMITTED")["step"] == 2
    # an interrupted later save (no marker) is ignored by discovery
    ckpt.write_json(f"{s3_bucket}/s3run/step_3/trainer_state.json", {"step": 3})
    more = _train([o for o in base if not o.startswith("stage.max_steps")] + ["stage.max_steps=3"],
                  str(tmp_path / "b"))
    full = _train([o for o in base if not o.startswith(("stage.max_steps", "train.run_name"))]
                  + ["stage.max_steps=3", "train.run_name=s3full"], str(tmp_path / "c"))
    assert more["losses"][:2] == part["losses"]
    assert more["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-7)
