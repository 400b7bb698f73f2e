"""Loader benchmark: streaming shard reader vs a LLaVA-style map-style Dataset, per core.

Both read the same synthetic data with the same preprocessing in the same run:

* ``stream``: ``aov_dist.data.stream.build_loader`` over the shards (shard-local tar reads
  in blocks, decode, skip accounting, resumable state);
* ``map``: what the official LLaVA training code does: ``json.load`` the whole record list, then
  per ``__getitem__`` open the loose image file(s) with PIL, ``convert("RGB")``, and preprocess;
  a shuffled torch ``DataLoader`` batches it.

Throughput per core = samples per CPU-second used by the loader (this process plus its DataLoader
workers; with ``--storage s3`` the loopback S3 server's CPU is left out, it stands for the storage
service); wall-clock samples/s are printed too. Each variant is warmed up once (page cache, lazy
imports), then run ``--repeat`` times alternately; the best run counts.

    .venv/bin/python benchmarks/bench_loader.py                       # read + decode + image processor
    .venv/bin/python benchmarks/bench_loader.py --preprocess none     # read + decode only
    .venv/bin/python benchmarks/bench_loader.py --storage s3     # both read from loopback S3
    .venv/bin/python benchmarks/bench_loader.py --workers 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
# run as a script from anywhere: import the package of this checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from aov_dist import storage  # noqa: E402
from aov_dist.data.config import DataConfig, DatasetSpec  # noqa: E402
from aov_dist.data.stream import build_loader, list_collate  # noqa: E402

LABELS = {"normal": 0, "anomalous": 1}


class LlavaStyleDataset(Dataset):
    """Map-style dataset in the manner of LLaVA's LazySupervisedDataset: JSON list + loose files."""

    def __init__(self, json_url: str, image_root: str, transform: Callable[[dict], Any]):
        self.records = json.loads(storage.read_bytes(json_url))
        self.image_root, self.transform = image_root, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        rec = self.records[i]
        files = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
        images = []
        for p in files:
            # local: a plain open() as in LLaVA; s3://: one object read per image through fsspec
            with storage.open_url(storage.join_url(self.image_root, p)) as f:
                images.append(Image.open(f).convert("RGB"))
        label = rec.get("label")
        raw = {"id": rec["id"], "images": images, "conversations": rec["conversations"],
               "label": LABELS.get(label, label), "source": "synthetic"}
        return self.transform(raw)


class ImageProcessorTransform:
    """The image half of the model's preprocessing: LLaVA-OneVision AnyRes (PIL backend)."""

    def __init__(self) -> None:
        from transformers import LlavaOnevisionImageProcessorPil

        self.proc = LlavaOnevisionImageProcessorPil()

    def __call__(self, raw: dict) -> dict:
        out = self.proc(raw["images"], return_tensors="pt")
        return {"id": raw["id"], "pixel_values": out["pixel_values"], "label": raw["label"]}


def decode_only(raw: dict) -> dict:
    return {"id": raw["id"], "sizes": [im.size for im in raw["images"]]}


def make_transform(kind: str) -> Callable[[dict], Any]:
    if kind == "none":
        return decode_only
    if kind == "image_processor":
        return ImageProcessorTransform()
    raise SystemExit(f"--preprocess {kind!r}: expected none or image_processor")


def prepare_data(root: Path, records: int, image_size: int, seed: int) -> tuple[str, str, str]:
    from aov_dist.data.shards import write_shards
    from aov_dist.data.synth import SynthConfig, generate

    res = generate(SynthConfig(out=str(root / "synth"), seed=seed, num_train=records,
                               num_bench=1, image_size=image_size))
    shards = root / "shards"
    write_shards([str(res.train_json)], str(shards), image_root=str(res.image_root),
                 shard_size_mb=16.0)
    return str(res.train_json), str(res.image_root), str(shards / "manifest.json")


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(make_iter: Callable[[], Any], limit: Optional[int] = None) -> dict:
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for batch in make_iter():
        n += len(batch)
        if limit is not None and n >= limit:
            break
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"samples": n, "wall_s": wall, "cpu_s": cpu}


def start_s3(root: Path) -> tuple[subprocess.Popen, str]:
    """A loopback moto S3 server with dummy credentials (like tests/conftest.py)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
                       "AWS_ENDPOINT_URL_S3": url})
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            break
        except Exception:
            time.sleep(0.2)
    return proc, url


def upload_tree(local: Path, prefix: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.write_bytes(f"{prefix}/{p.relative_to(local).as_posix()}", p.read_bytes())


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=240)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both loaders")
    ap.add_argument("--preprocess", default="image_processor", choices=["image_processor", "none"])
    ap.add_argument("--storage", default="local", choices=["local", "s3"],
                    help="s3: both read from a loopback moto S3 server (loose objects vs shards)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", default=None, help="reuse/keep the generated data in this folder")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    tmp = None
    root = Path(args.data) if args.data else Path(tmp := tempfile.mkdtemp(prefix="bench_loader_"))
    if (root / "shards" / "manifest.json").exists():
        train_json = str(next((root / "synth" / "train").glob("*.json")))
        image_root, manifest = str(root / "synth" / "train" / "images"), str(root / "shards" / "manifest.json")
    else:
        t = time.perf_counter()
        train_json, image_root, manifest = prepare_data(root, args.records, args.image_size, 0)
        print(f"generated {args.records} records + shards in {time.perf_counter() - t:.1f} s "
              f"under {root}", file=sys.stderr)
    records = len(json.loads(Path(train_json).read_text()))
    server = None
    if args.storage == "s3":
        server, _ = start_s3(root)
        upload_tree(root / "synth" / "train", "s3://bench/loose")
        upload_tree(root / "shards", "s3://bench/shards")
        train_json = f"s3://bench/loose/{Path(train_json).name}"
        image_root, manifest = "s3://bench/loose/images", "s3://bench/shards/manifest.json"

    transform = make_transform(args.preprocess)
    cfg = DataConfig(datasets=[DatasetSpec("synthetic", manifest)], micro_batch_size=args.batch_size,
                     num_workers=args.workers, block_size=64, seed=0)
    map_ds = LlavaStyleDataset(train_json, image_root, transform)

    def stream_iter():
        return iter(build_loader(cfg, 0, 1, transform=transform, collate=list_collate))

    def map_iter():
        kw = {"prefetch_factor": 2} if args.workers else {}
        return iter(DataLoader(map_ds, batch_size=args.batch_size, shuffle=True,
                               num_workers=args.workers, collate_fn=list_collate, **kw))

    loaders = (("stream", stream_iter), ("map", map_iter))
    runs: dict[str, list[dict]] = {"stream": [], "map": []}
    try:
        for _, fn in loaders:
            time_loader(fn, limit=4 * args.batch_size)  # warm-up: imports, page cache, workers
        for _ in range(args.repeat):
            for name, fn in loaders:
                runs[name].append(time_loader(fn))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    # per core = samples per CPU-second spent by the loader (this process + its workers); the
    # S3 server's own CPU is not counted (it stands for the storage service)
    best = {k: max(r["samples"] / r["cpu_s"] for r in v) for k, v in runs.items()}
    wall = {k: max(r["samples"] / r["wall_s"] for r in v) for k, v in runs.items()}
    ratio = best["stream"] / best["map"]
    report = {"records": records, "image_size": args.image_size, "preprocess": args.preprocess,
              "storage": args.storage, "workers": args.workers, "batch_size": args.batch_size,
              "samples_per_cpu_s": best, "samples_per_s_wall": wall, "runs": runs,
              "ratio_stream_over_map_per_core": ratio}
    print(f"loader benchmark: {records} records, {args.image_size} px, preprocess={args.preprocess}, "
          f"storage={args.storage}, workers={args.workers}, batch={args.batch_size}")
    print(f"  {'loader':<8} {'samples/CPU-s':>14} {'samples/s wall':>15}")
    for k in ("stream", "map"):
        print(f"  {k:<8} {best[k]:>14.1f} {wall[k]:>15.1f}")
    print(f"  ratio stream/map per core: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
