"""Evaluation benchmark: samples/s of ``aov_dist.eval.evaluate`` with 1 and 2 Ray workers, per
checkpoint with fresh workers and with a warm pool.

The untrained tiny model is saved as an HF folder (what a checkpoint's hf/ holds), twice (two
"checkpoints"), and evaluated on the synthetic VisA-D&R-format benchmark, detection only. One Ray
instance serves every call (its start-up is reported on its own).

* fresh: ``evaluate`` without a pool starts its actors and loads the model in each (what one
  ``aov-eval`` call pays); the marginal rate, (N_large - N_small) / (T_large - T_small), removes
  those fixed costs and is the rate a large benchmark approaches;
* warm: an ``Evaluator`` (the watcher's and the demo's way) evaluates checkpoint A, then checkpoint
  B on the same actors: B's time is the time per checkpoint once the pool is up (model load + work).

Calls alternate between 1 and 2 workers (``--repeat`` rounds; the best time of each cell counts).

    .venv/bin/python benchmarks/bench_eval.py                    # 48 and 240 detection images
    .venv/bin/python benchmarks/bench_eval.py --small 8 --large 24 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_BENCHMARK, machine, machine_line, markdown_table  # noqa: E402


def save_untrained(path: Path) -> str:
    """The random-init tiny model + processor as an HF folder (as aov_dist.demo's baseline)."""
    from aov_dist.model import build_model
    from aov_dist.model.config import ModelConfig

    model, processor = build_model(ModelConfig(preset="tiny"))
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)


def _cfg(benchmark: str, workers: int, limit: int, batch_size: int):
    from aov_dist.eval.config import EvalConfig

    return EvalConfig(benchmark=benchmark, tasks=["detection"], limit=limit, num_workers=workers,
                      batch_size=batch_size, plots=False)


def _timed(fn, checkpoint: str, limit: int, what: str) -> float:
    t0 = time.perf_counter()
    result = fn(checkpoint)
    elapsed = time.perf_counter() - t0
    if len(result.detection_rows) != limit:
        raise RuntimeError(f"{what}, limit {limit}: got {len(result.detection_rows)} rows")
    return elapsed


def timed_eval(checkpoint: str, benchmark: str, workers: int, limit: int, batch_size: int) -> float:
    """One evaluation on workers started for it (and stopped after it)."""
    from aov_dist.cluster.config import ClusterConfig
    from aov_dist.eval.evaluate import evaluate

    cfg = _cfg(benchmark, workers, limit, batch_size)
    return _timed(lambda c: evaluate(cfg, c, ClusterConfig()), checkpoint, limit, f"{workers} workers")


def timed_pool(checkpoints: tuple[str, str], benchmark: str, workers: int, limit: int,
               batch_size: int) -> tuple[float, float]:
    """Checkpoint A then checkpoint B on one Evaluator: (A with fresh actors, B on the warm pool)."""
    from aov_dist.cluster.config import ClusterConfig
    from aov_dist.eval.evaluate import Evaluator

    with Evaluator(_cfg(benchmark, workers, limit, batch_size), ClusterConfig()) as ev:
        first = _timed(ev, checkpoints[0], limit, f"{workers} workers, pool, 1st")
        who = list(ev.pool.loaded_by)
        second = _timed(ev, checkpoints[1], limit, f"{workers} workers, pool, 2nd")
        if ev.pool.loaded_by != who:
            raise RuntimeError(f"{workers} workers: the pool's actors changed between checkpoints")
    return first, second


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--benchmark", default=str(DEFAULT_BENCHMARK))
    ap.add_argument("--small", type=int, default=48, help="detection images of the short call")
    ap.add_argument("--large", type=int, default=240, help="detection images of the long call (the full synthetic set)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--checkpoint", default=None, help="an HF folder (default: the untrained tiny model)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not (Path(a.benchmark) / "detection.json").exists():
        raise SystemExit(f"{a.benchmark}/detection.json does not exist: run `make shards` first")
    if not 0 < a.small < a.large:
        raise SystemExit("--small must be > 0 and < --large")
    logging.basicConfig(level=logging.WARNING)
    import ray

    info = machine()
    tmp = tempfile.mkdtemp(prefix="bench_eval_")
    try:
        checkpoint = a.checkpoint or save_untrained(Path(tmp) / "hf")
        second = checkpoint
        if Path(checkpoint).is_dir():  # another folder: the pool really reads and loads again
            second = str(Path(tmp) / "hf_b")
            shutil.copytree(checkpoint, second)
        t0 = time.perf_counter()
        # our own local instance (2 CPUs: the 2-worker pool fits), never someone else's cluster
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        ray_start = time.perf_counter() - t0
        timed_eval(checkpoint, a.benchmark, 1, min(a.batch_size, a.small), a.batch_size)  # warm-up: imports, worker pool
        best: dict[tuple[Any, ...], float] = {}

        def keep(key: tuple[Any, ...], t: float) -> None:
            best[key] = min(t, best.get(key, float("inf")))

        for _ in range(a.repeat):
            for w in (1, 2):
                keep((w, "fresh", a.small), timed_eval(checkpoint, a.benchmark, w, a.small, a.batch_size))
                cold, warm = timed_pool((checkpoint, second), a.benchmark, w, a.large, a.batch_size)
                keep((w, "fresh", a.large), cold)  # the pool's first call starts its actors: a fresh call
                keep((w, "warm", a.large), warm)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    res: dict[int, dict[str, float]] = {}
    for w in (1, 2):
        ts, tl, tw = best[(w, "fresh", a.small)], best[(w, "fresh", a.large)], best[(w, "warm", a.large)]
        marginal = (a.large - a.small) / (tl - ts) if tl > ts else float("nan")
        res[w] = {"t_small_s": ts, "t_large_s": tl, "t_warm_s": tw, "end_to_end_samples_per_s": a.large / tl,
                  "warm_samples_per_s": a.large / tw, "marginal_samples_per_s": marginal,
                  "fixed_s": ts - a.small * (tl - ts) / (a.large - a.small),
                  "warm_fixed_s": tw - a.large / marginal}
    ratio_e2e = res[2]["end_to_end_samples_per_s"] / res[1]["end_to_end_samples_per_s"]
    ratio_warm = res[2]["warm_samples_per_s"] / res[1]["warm_samples_per_s"]
    ratio_marg = res[2]["marginal_samples_per_s"] / res[1]["marginal_samples_per_s"]
    print(machine_line(info))
    print(f"eval benchmark: untrained tiny Anomaly-OV, detection only, synthetic benchmark, batch {a.batch_size}, "
          f"{a.small} and {a.large} images per call, best of {a.repeat}; Ray start-up {ray_start:.1f} s (once); "
          f"fresh = workers started for the call, warm = 2nd checkpoint on an Evaluator's live workers")
    rows = [[w, res[w]["t_large_s"], res[w]["t_warm_s"], res[w]["end_to_end_samples_per_s"],
             res[w]["warm_samples_per_s"], res[w]["marginal_samples_per_s"], res[w]["fixed_s"],
             res[w]["warm_fixed_s"]] for w in (1, 2)]
    rows.append(["2 / 1", res[1]["t_large_s"] / res[2]["t_large_s"], res[1]["t_warm_s"] / res[2]["t_warm_s"],
                 ratio_e2e, ratio_warm, ratio_marg, float("nan"), float("nan")])
    print(markdown_table(["workers", f"s per checkpoint fresh ({a.large} images)", "s per checkpoint warm",
                          "samples/s fresh", "samples/s warm", "samples/s marginal", "fixed s fresh",
                          "fixed s warm"], rows))
    out = {"machine": info, "args": vars(a), "ray_start_s": ray_start, "results": res,
           "ratio_end_to_end": ratio_e2e, "ratio_warm": ratio_warm, "ratio_marginal": ratio_marg}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
