"""Shared helpers of the benchmark scripts: machine description, Hydra job configs, a process-tree
memory sampler, step-time statistics, a loopback S3 server and markdown tables.

Every benchmark compares variants measured side by side in one run on the same machine, so the
ratios mean something even on a loaded, shared CPU box where absolute times drift.
"""
from __future__ import annotations

import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT / "data_shards" / "synthetic" / "shards" / "manifest.json"
DEFAULT_BENCHMARK = ROOT / "data_shards" / "synthetic" / "benchmark"
DEFAULT_TRAIN_JSON = ROOT / "data_shards" / "synthetic" / "train" / "synthetic_instruct.json"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (goes into every report)."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"nproc": os.cpu_count(), "cpu": model, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python": platform.python_version(), "loadavg_1m": round(load[0], 2)}


def machine_line(m: dict[str, Any]) -> str:
    return f"machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}, load {m['loadavg_1m']} at start, {m['date']}"


def compose(overrides: Sequence[str]):
    """conf/config.yaml with ``overrides`` (the same composition aov-train does), as a DictConfig."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from aov_dist.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def child_env(**extra: str) -> dict[str, str]:
    """Environment of benchmark subprocesses: one intra-op thread per process (every variant gets
    the same), CPU DeepSpeed, the checkout importable."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])})
    env.update(extra)
    return env


class TreeMemory:
    """Samples the summed RSS of a process and all its descendants every ``interval`` seconds
    (a thread); ``peak`` is the largest sum seen. Shared pages count once per process (RSS).
    Sampling ~30 processes with psutil costs a few % of a core: 0.5 s keeps that off the variants."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        if total > self.peak:
            self.peak, self.peak_procs = total, len(procs)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def run_monitored(cmd: list[str], env: dict[str, str], timeout: float, log_path: Path,
                  cwd: Optional[Path] = None) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``log_path``; wall time, exit code, peak tree RSS."""
    t0 = time.time()
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                      cwd=str(cwd or ROOT), start_new_session=True) as proc:
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # our own session: the variant's whole process group
                rc = -9
    out = {"start_time": t0, "wall_s": time.time() - t0, "rc": rc, "peak_rss_mb": mem.peak / 2**20,
           "peak_procs": mem.peak_procs, "log": str(log_path)}
    if rc != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[:4]}... exited with {rc} (log {log_path}):\n{tail}")
    return out


def step_stats(step_end_times: Sequence[float], samples_per_step: int, warmup: int) -> dict[str, float]:
    """Steady state from the wall-clock end time of every optimizer step: the median of the
    intervals between consecutive step ends after ``warmup`` steps (the first interval measured is
    step warmup+1's), and the samples/s it implies."""
    t = list(step_end_times)
    if len(t) < warmup + 2:
        raise ValueError(f"{len(t)} step times recorded: need more than warm-up {warmup} + 1")
    intervals = [b - a for a, b in zip(t[warmup:], t[warmup + 1:])]
    med = statistics.median(intervals)
    return {"step_s": med, "samples_per_s": samples_per_step / med, "steps_timed": len(intervals),
            "step_s_min": min(intervals), "step_s_max": max(intervals)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """A loopback moto S3 server (started and stopped by the benchmark) with dummy credentials in
    this process's environment and a bucket ``bucket``."""

    def __init__(self, bucket: str = "bench"):
        self.bucket = bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "MotoS3":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url,
                           "AWS_ENDPOINT_URL_S3": self.url})
        import boto3

        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=self.bucket)
                return self
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"moto S3 server on {self.url} did not come up")
                time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def dir_bytes(path: str) -> int:
    """Total size of the files under a local folder or an s3:// prefix."""
    from aov_dist import storage

    if storage.is_remote(path):
        fs_, p = storage.get_fs(path)
        return int(sum(info["size"] for info in fs_.find(p, detail=True).values()))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """The last markdown table in ``text`` as rows of {column: cell} (tests read the output back)."""
    blocks, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    if not blocks:
        raise ValueError("no markdown table in the output")
    header = [c.strip() for c in blocks[-1][0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in blocks[-1][2:]]
