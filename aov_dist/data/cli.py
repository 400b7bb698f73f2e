"""``aov-data``: synthetic data, shard writing and shard inspection.

    aov-data synth   --out DIR [--seed N] [--num-train N] [--num-bench N] [--image-size PX] ...
    aov-data shard   --input a.json [--input b.json] [--image-root DIR] --out DIR|s3://b/p
                     [--shard-size-mb N] [--on-error skip|fail] [--prefix shard] [--overwrite]
    aov-data inspect DIR|s3://b/p|.../manifest.json [--no-decode]

Exit status: 0 on success, 1 when records, shards or the manifest are invalid, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from aov_dist.data.synth_images import CLASSES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aov-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate synthetic Anomaly-Instruct + VisA-D&R format data")
    s.add_argument("--out", required=True, help="output folder (train/, benchmark/, meta.json)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-train", type=int, default=1200, help="training records")
    s.add_argument("--num-bench", type=int, default=240, help="held-out benchmark images")
    s.add_argument("--image-size", type=int, default=112, help="image side in pixels")
    s.add_argument("--multiview-fraction", type=float, default=0.1, help="share of 4-view training records")
    s.add_argument("--explicit-label-fraction", type=float, default=1.0,
                   help="share of training records with an explicit 'label' field (others: derived)")
    s.add_argument("--classes", default=",".join(CLASSES), help="comma-separated subset of " + ",".join(CLASSES))

    w = sub.add_parser("shard", help="validate LLaVA records and write WebDataset shards + manifest")
    w.add_argument("--input", action="append", required=True, help="record JSON file (repeatable)")
    w.add_argument("--image-root", default=None, help="folder image paths are relative to (default: each input's folder)")
    w.add_argument("--out", default="data_shards/shards", help="local folder or s3://bucket/prefix")
    w.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MiB")
    w.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="skip: leave invalid records out and list them in the manifest; fail: write nothing")
    w.add_argument("--prefix", default="shard", help="shard file name prefix")
    w.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    w.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL[_S3])")

    i = sub.add_parser("inspect", help="check shards against their manifest and print a summary")
    i.add_argument("url", help="shard folder, manifest.json, or s3://bucket/prefix")
    i.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    i.add_argument("--endpoint-url", default=None)
    return p


def _synth(args, console: Console) -> int:
    from aov_dist.data.synth import SynthConfig, generate

    cfg = SynthConfig(out=args.out, seed=args.seed, num_train=args.num_train, num_bench=args.num_bench,
                      image_size=args.image_size, multiview_fraction=args.multiview_fraction,
                      explicit_label_fraction=args.explicit_label_fraction,
                      classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()))
    t0 = time.perf_counter()
    try:
        res = generate(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    console.print(f"{res.num_train_records} training records ({res.num_train_images} images) -> {res.train_json}")
    console.print(f"{res.num_bench_images} benchmark images -> {res.benchmark_dir}")
    console.print(f"image root for 'aov-data shard': {res.image_root}  ({dt:.1f} s)")
    return 0


def _shard(args, console: Console) -> int:
    from aov_dist.data.shards import ShardError, write_shards

    try:
        manifest = write_shards(args.input, args.out, image_root=args.image_root,
                                shard_size_mb=args.shard_size_mb, on_error=args.on_error,
                                prefix=args.prefix, overwrite=args.overwrite,
                                endpoint_url=args.endpoint_url, log=console.print)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t = manifest["totals"]
    console.print(f"labels {t['labels']}  derived {t['derived_labels']}  skipped {len(manifest['skipped'])}")
    for s in manifest["skipped"][:20]:
        print(f"skipped {s['file']}: record {s['index']} (id={s['id']!r}): {s['reason']}", file=sys.stderr)
    return 0


def _inspect(args, console: Console) -> int:
    from aov_dist.data.shard_inspect import ShardFormatError, inspect_shards

    try:
        report = inspect_shards(args.url, decode_images=not args.no_decode, endpoint_url=args.endpoint_url)
    except ShardFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = Table(title=report.manifest_url)
    for col in ("shard", "samples", "bytes", "sha256", "status"):
        table.add_column(col)
    for s in report.shards:
        table.add_row(s.url.rsplit("/", 1)[-1], str(s.samples), str(s.bytes), s.sha256[:12],
                      "ok" if not s.problems else f"{len(s.problems)} problem(s)")
    console.print(table)
    t = report.manifest.get("totals", {})
    console.print(f"samples {t.get('samples')}  labels {t.get('labels')}  derived {t.get('derived_labels')}  "
                  f"skipped {len(report.manifest.get('skipped', []))}  writer {report.manifest.get('writer')}")
    if not report.ok:
        for p in report.all_problems():
            print(f"MISMATCH {p}", file=sys.stderr)
        return 1
    console.print("all shards match the manifest")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    return {"synth": _synth, "shard": _shard, "inspect": _inspect}[args.command](args, console)


if __name__ == "__main__":
    sys.exit(main())
