"""Checkpoint benchmark: save / restore time and size of the tiny model's checkpoints, local and
to a loopback S3 server, with the DeepSpeed ZeRO-3 engine of our training loop.

2 gloo ranks (spawned processes, DeepSpeed for real, no Ray: Ray adds nothing to a save) build the
model and engine exactly as ``aov_dist.train.loop.run_training`` does and train one step (so the
optimizer state exists). Then, per storage (local folder, ``s3://`` on a moto server started
here):

* blocked per save: ``CheckpointWriter.save`` (DeepSpeed shards of every rank, loader and RNG
  state, the consolidation of the hf/ export; on local storage also the hf/ write, the barrier,
  the COMMITTED marker and pruning; on s3:// the upload runs in the background), i.e. how long
  training stands still; and the whole save, ``save`` + ``finish`` (waiting for the upload and the
  commit), i.e. what a synchronous save would block; its parts: ``strategy.save`` (ds/) and the
  hf/ export;
* restore: ``checkpointing.restore`` (each rank's own files from s3://, ``engine.load_checkpoint``,
  loader, RNG), and the bytes each rank downloaded;
* sizes of ds/, hf/ and the whole step folder.

Times are the slowest rank's (the save ends in a barrier), median over ``--saves`` saves.

    .venv/bin/python benchmarks/bench_checkpoint.py
    .venv/bin/python benchmarks/bench_checkpoint.py --saves 1 --storage local
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEFAULT_MANIFEST, MotoS3, compose, dir_bytes, free_port, machine,  # noqa: E402
                    machine_line, markdown_table)

WORLD = 2


def job_overrides(stage: str, manifest: str, storage: str) -> list[str]:
    lrs = (["stage.lr.expert=1e-4"] if stage == "stage1"
           else ["stage.lr.projector=1e-4", "stage.lr.llm=1e-4", "stage.require_init=false"])
    return [f"stage={stage}", *lrs, "stage.global_batch_size=4", "data.micro_batch_size=2", "stage.max_steps=1000",
            "data.max_length=512", f"data.datasets=[{{name: synthetic, manifest: '{Path(manifest).resolve()}', weight: 1.0}}]",
            "cluster.workers_per_node=2", f"train.storage_path='{storage}'", "train.run_name=bench",
            "train.keep_checkpoints=1", "tracking.enabled=false"]


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return _max_over_ranks(time.perf_counter() - t0)


def _rank_main(rank: int, port: int, a: dict, storages: dict[str, str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from aov_dist.config import validate
    from aov_dist.data.skip_policy import SkipPolicy
    from aov_dist.train import checkpoint as ckpt
    from aov_dist.train import loop
    from aov_dist.train.checkpointing import CheckpointWriter, restore
    from aov_dist.train.strategy import DeepSpeedStrategy
    from aov_dist.train.tasks import make_task

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    loop.quiet_library_warnings()
    report: dict[str, Any] = {}
    for kind, storage in storages.items():
        cfg = validate(compose(job_overrides(a["stage"], a["manifest"], storage)))
        ckpt.seed_everything(0)
        task = make_task(cfg.stage.name)
        strategy = DeepSpeedStrategy(cfg)
        strategy.init_distributed()
        model, processor = strategy.build_model(lambda: task.build_model(cfg, gather=strategy.gathered_for_update))
        groups = model.stage_parameter_groups(cfg.stage.name)
        loader = task.build_loader(cfg, processor, rank, WORLD)
        strategy.initialize(model, groups, 1000, 100)
        batches = iter(loader)
        loss = task.loss(strategy, strategy.to_device(next(batches)))  # one step: optimizer state exists
        strategy.backward(loss)
        strategy.step()
        committed: list[str] = []
        writer = CheckpointWriter(cfg, strategy, processor, rank, WORLD, lambda s, p, m: committed.append(p))
        saves, whole, ds_only, hf_only = [], [], [], []
        for i in range(a["saves"]):
            start = time.perf_counter()
            saves.append(_timed(lambda: writer.save(i + 1, [0.0] * (i + 1), loader, None, {})))
            writer.finish()
            dist.barrier()
            whole.append(time.perf_counter() - start)
            scratch = tempfile.mkdtemp(prefix="bench-ckpt-part-")  # the parts, on local disk
            ds_only.append(_timed(lambda: strategy.save(f"{scratch}/ds")))
            hf_only.append(_timed(lambda: strategy.save_hf(f"{scratch}/hf", processor)))
            shutil.rmtree(scratch, ignore_errors=True)
        path = committed[-1]
        restored = loop.LoopResult(step=0)
        skips = SkipPolicy(cfg.data.skip_window, cfg.data.max_skip_fraction, cfg.data.fail_skip_fraction)
        restore_s = [_timed(lambda: restore(strategy, loader, skips, path, rank, restored))
                     for _ in range(a["saves"])]
        if restored.step != a["saves"]:
            raise RuntimeError(f"restored step {restored.step} from {path}, saved {a['saves']}")
        read = [0.0] * WORLD
        read[rank] = float(restored.restored_bytes)
        read = strategy.sum_over_ranks(read)
        if rank == 0:
            report[kind] = {"path": path, "save_s": saves, "whole_save_s": whole, "ds_save_s": ds_only,
                            "hf_export_s": hf_only, "restore_s": restore_s, "restored_bytes_per_rank": read,
                            "bytes_total": dir_bytes(path),
                            "bytes_ds": dir_bytes(f"{path}/ds"), "bytes_hf": dir_bytes(f"{path}/hf"),
                            "params": strategy.numel()}
        del model  # the strategy (and its engine) is replaced in the next round
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="stage2", choices=["stage1", "stage2"])
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--storage", default="local,s3")
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not Path(a.manifest).exists():
        raise SystemExit(f"{a.manifest} does not exist: run `make shards` first")
    import torch.multiprocessing as mp

    info = machine()
    tmp = tempfile.mkdtemp(prefix="bench_ckpt_")
    kinds = a.storage.split(",")
    storages = {k: (f"{tmp}/runs" if k == "local" else "s3://bench/runs") for k in kinds}
    out = f"{tmp}/report.json"
    try:
        s3 = MotoS3() if "s3" in kinds else None
        if s3 is not None:
            s3.__enter__()  # env (endpoint, dummy keys) set here is inherited by the spawned ranks
        try:
            mp.spawn(_rank_main, args=(free_port(), {"stage": a.stage, "manifest": a.manifest, "saves": a.saves},
                                       storages, out), nprocs=WORLD, join=True)
        finally:
            if s3 is not None:
                s3.__exit__()
        report = json.loads(Path(out).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    print(machine_line(info))
    print(f"checkpoint benchmark: tiny Anomaly-OV {a.stage} ({report[kinds[0]]['params'] / 1e6:.2f} M params), "
          f"DeepSpeed ZeRO-3, {WORLD} gloo ranks, median of {a.saves} saves/restores, slowest rank")
    rows = [[k, med(r["save_s"]), med(r["whole_save_s"]), med(r["save_s"]) / med(r["whole_save_s"]),
             med(r["ds_save_s"]), med(r["hf_export_s"]), med(r["restore_s"]),
             " / ".join(f"{b / 2**20:.2f}" for b in r["restored_bytes_per_rank"]),
             r["bytes_total"] / 2**20, r["bytes_ds"] / 2**20, r["bytes_hf"] / 2**20] for k, r in report.items()]
    print(markdown_table(["storage", "blocked per save s", "whole save s", "blocked / whole", "ds/ save s",
                          "hf/ export s", "restore s", "MB read per rank to resume", "step folder MB", "ds/ MB",
                          "hf/ MB"], rows))
    result = {"machine": info, "args": vars(a), "results": report}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
