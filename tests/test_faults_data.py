"""Bad data during a real 2-rank ZeRO-3 run (gloo, no Ray): corrupt tar header, truncated PNG, 1x1
image, missing image member, malformed JSON, <image> count mismatch. Skip mode trains through them
and logs data/skipped_<reason> (summed over ranks) to MLflow; strict mode (data.on_error=fail)
stops with an error naming shard and key. Neither hangs: every run has a deadline."""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image
from train_harness import free_port as _free_port

pytestmark = pytest.mark.slow
DEADLINE_S = 420


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buf, "PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def bad_shards(src_manifest: Path, out: Path) -> tuple[str, dict[str, int], dict[str, str]]:
    """Copy the synthetic shards into 2 shards with one planted defect per kind.
    Returns (manifest, expected skip counts, {kind: (shard url, key)})."""
    from aov_dist.data.shard_inspect import iter_shard

    manifest = json.loads(src_manifest.read_text())
    samples = [s for e in manifest["shards"] for s in iter_shard(str(src_manifest.parent / e["url"]))]
    single = [i for i, s in enumerate(samples) if len(s.images) == 1 and s.meta.get("label") is not None]
    plan = {single[1]: "bad_image", single[3]: "tiny_image", single[5]: "missing_member",
            single[-6]: "bad_json", single[-4]: "mismatch"}
    out.mkdir()
    half = len(samples) // 2
    parts = [samples[:half], samples[half:]]
    entries, where = [], {}
    for si, part in enumerate(parts):
        name = f"bad-{si:06d}.tar"
        with tarfile.open(out / name, "w") as tf:
            for s in part:
                i = samples.index(s)
                kind = plan.get(i)
                meta = dict(s.meta)
                if kind:
                    where[kind] = (str(out / name), s.key)
                if kind == "mismatch":
                    meta["conversations"] = [dict(t) for t in meta["conversations"]]
                    meta["conversations"][0]["value"] = "<image><image>\n" + meta["conversations"][0]["value"]
                _add(tf, f"{s.key}.json", b'{"id": "x", "conversations": [' if kind == "bad_json"
                     else json.dumps(meta).encode())
                for v, (img, ext) in enumerate(zip(s.images, s.exts)):
                    if kind == "missing_member":
                        continue
                    data = {"bad_image": img[: len(img) // 3], "tiny_image": _png((1, 1))}.get(kind, img)
                    _add(tf, f"{s.key}.img{v}.{ext}", data)
        entries.append({"url": name, "samples": len(part), "bytes": (out / name).stat().st_size, "sha256": ""})
    # damage the header of the 3rd-last sample of shard 1: it and the 2 after it are lost
    tar1 = out / entries[1]["url"]
    with tarfile.open(tar1) as tf:
        key = parts[1][-3].key
        offset = next(m.offset for m in tf.getmembers() if m.name == f"{key}.json")
    raw = bytearray(tar1.read_bytes())
    raw[offset + 148:offset + 156] = b"garbage!"
    tar1.write_bytes(bytes(raw))
    where["corrupt_tar"] = (str(tar1), key)
    lost = [s for s in parts[1][-3:] if len(s.images) == 1 and s.meta.get("label") is not None]
    manifest = dict(manifest, shards=entries)
    (out / "manifest.json").write_text(json.dumps(manifest))
    expected = {"bad_image": 1, "tiny_image": 1, "image_count_mismatch": 2, "bad_json": 1, "corrupt_tar": len(lost)}
    return str(out / "manifest.json"), expected, where


def _rank(rank: int, world: int, port: int, container: dict, run_id, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from aov_dist.config import to_typed
    from aov_dist.train.loop import run_training

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    r = run_training(to_typed(container), rank, world, run_id=run_id)
    Path(out, f"rank_{rank}.json").write_text(json.dumps({"losses": r.losses, "skipped": r.skipped,
                                                          "checkpoints": r.checkpoints}))
    dist.destroy_process_group()


def _spawn(cfg, run_id, out: Path):
    """Run 2 ranks with a deadline; returns None or the exception a rank raised."""
    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    ctx = mp.spawn(_rank, args=(2, _free_port(), container, run_id, str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"2-rank run still running after {DEADLINE_S} s: a rank hangs")
    except Exception as e:  # a rank raised: spawn terminated the other one
        return e
    return None


def _overrides(manifest: str, tmp_path: Path, run: str, extra=()):
    from train_harness import tiny_overrides

    return tiny_overrides(manifest, tmp_path / "runs", world=2, num_workers=0, steps=-1, global_batch=4, micro=2,
                          run_name=run, tracking=True,
                          extra=["stage.epochs=1", "train.checkpoint_every_steps=100", "data.shuffle_buffer=4",
                                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                 f"tracking.artifact_location={tmp_path}/art", *extra])


def test_skip_mode_trains_through_bad_data_and_logs_global_counts(tmp_path, synthetic_shards):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.mlflow_tracker import create_run
    from train_harness import typed_cfg

    manifest, expected, _ = bad_shards(synthetic_shards.manifest_path, tmp_path / "bad")
    cfg = typed_cfg(_overrides(manifest, tmp_path, "skip"))
    run_id = create_run(cfg.tracking, "skip", {}, "")
    assert _spawn(cfg, run_id, tmp_path / "out") is None
    ranks = [json.loads((tmp_path / f"out/rank_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) >= 3
    # both ranks met bad samples: the summed counts are the planted ones
    summed = {}
    for r in ranks:
        for k, v in r["skipped"].items():
            summed[k] = summed.get(k, 0) + v
    # (a slot whose range runs short refills from the same range, so a bad sample may be met twice)
    assert all(r["skipped"] for r in ranks)
    assert set(summed) == set(expected) and all(summed[k] >= n for k, n in expected.items()), summed
    client = MlflowClient(cfg.tracking.uri)
    logged = {k[len("data/skipped_"):]: v for k, v in client.get_run(run_id).data.metrics.items()
              if k.startswith("data/skipped_")}
    assert logged == {k: float(v) for k, v in summed.items()}  # the job's counts, not rank 0's
    assert Path(ranks[0]["checkpoints"][-1], "COMMITTED").exists()


def test_strict_mode_stops_with_shard_and_key_and_no_hang(tmp_path, synthetic_shards):
    from train_harness import typed_cfg

    manifest, _, where = bad_shards(synthetic_shards.manifest_path, tmp_path / "bad")
    cfg = typed_cfg(_overrides(manifest, tmp_path, "strict", extra=["data.on_error=fail"]))
    cfg.tracking.enabled = False
    err = _spawn(cfg, None, tmp_path / "out")
    assert err is not None
    text = str(err)
    named = [(kind, url, key) for kind, (url, key) in where.items() if url in text and repr(key) in text]
    assert "SampleError" in text and named, text[-2000:]
    assert not list((tmp_path / "runs").rglob("COMMITTED"))
