"""Evaluation benchmark: samples/s of ``aov_dist.eval.evaluate.evaluate`` with 1 and 2 Ray workers.

The untrained tiny model is saved as an HF folder (what a checkpoint's hf/ holds) and evaluated on
the synthetic VisA-D&R-format benchmark, detection only. One Ray instance serves every call (its
start-up is reported on its own); each ``evaluate`` call starts its actors and loads the model in
each, as the watcher does per checkpoint, so the end-to-end time is the time per checkpoint
evaluation. The marginal rate, (N_large - N_small) / (T_large - T_small), removes those fixed
costs and is the rate a large benchmark approaches. Calls alternate between 1 and 2 workers
(``--repeat`` rounds; the best time of each cell counts).

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


def timed_eval(checkpoint: str, benchmark: str, workers: int, limit: int, batch_size: int) -> float:
    from aov_dist.cluster.config import ClusterConfig
    from aov_dist.eval.config import EvalConfig
    from aov_dist.eval.evaluate import evaluate

    cfg = EvalConfig(benchmark=benchmark, tasks=["detection"], limit=limit, num_workers=workers,
                     batch_size=batch_size, plots=False)
    t0 = time.perf_counter()
    result = evaluate(cfg, checkpoint, ClusterConfig())
    elapsed = time.perf_counter() - t0
    if len(result.detection_rows) != limit:
        raise RuntimeError(f"{workers} workers, limit {limit}: got {len(result.detection_rows)} rows")
    return elapsed


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
        t0 = time.perf_counter()
        # our own local instance (2 CPUs: the 2-worker pool fits), never someone else's cluster
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        ray_start = time.perf_counter() - t0
        timed_eval(checkpoint, a.benchmark, 1, min(a.batch_size, a.small), a.batch_size)  # warm-up: imports, worker pool
        best: dict[tuple[int, int], float] = {}
        for _ in range(a.repeat):
            for n in (a.small, a.large):
                for w in (1, 2):
                    t = timed_eval(checkpoint, a.benchmark, w, n, a.batch_size)
                    best[(w, n)] = min(t, best.get((w, n), float("inf")))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    res: dict[int, dict[str, float]] = {}
    for w in (1, 2):
        ts, tl = best[(w, a.small)], best[(w, a.large)]
        res[w] = {"t_small_s": ts, "t_large_s": tl, "end_to_end_samples_per_s": a.large / tl,
                  "marginal_samples_per_s": (a.large - a.small) / (tl - ts) if tl > ts else float("nan"),
                  "fixed_s": ts - a.small * (tl - ts) / (a.large - a.small)}
    ratio_e2e = res[2]["end_to_end_samples_per_s"] / res[1]["end_to_end_samples_per_s"]
    ratio_marg = res[2]["marginal_samples_per_s"] / res[1]["marginal_samples_per_s"]
    print(machine_line(info))
    print(f"eval benchmark: untrained tiny Anomaly-OV, detection only, synthetic benchmark, batch {a.batch_size}, "
          f"{a.small} and {a.large} images per call, best of {a.repeat}; Ray start-up {ray_start:.1f} s (once)")
    rows = [[w, res[w]["t_large_s"], res[w]["end_to_end_samples_per_s"], res[w]["marginal_samples_per_s"],
             res[w]["fixed_s"]] for w in (1, 2)]
    rows.append(["2 / 1", res[1]["t_large_s"] / res[2]["t_large_s"], ratio_e2e, ratio_marg, float("nan")])
    print(markdown_table(["workers", f"s per checkpoint ({a.large} images)", "samples/s end-to-end",
                          "samples/s marginal", "fixed s per call"], rows))
    out = {"machine": info, "args": vars(a), "ray_start_s": ray_start, "results": res,
           "ratio_end_to_end": ratio_e2e, "ratio_marginal": ratio_marg}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
