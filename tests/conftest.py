"""Shared fixtures: a loopback S3 server, a small synthetic data set, and its shards.

* ``s3_server`` (session): moto's S3 server on 127.0.0.1 (free port); sets dummy credentials,
  ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for the test process
  (restored afterwards); yields the endpoint URL (``http://127.0.0.1:<port>``).
* ``s3_bucket`` (function): a fresh, empty bucket on that server; yields ``"s3://<name>"``.
* ``synthetic_data`` (session): ``SyntheticData`` paths of a small generated data set (40 training
  records at 64 px, ~10 % multi-view, 20 benchmark images; seed 0). Treat it as read-only: copy
  it (``shutil.copytree``) before changing anything.
* ``synthetic_shards`` (session): ``SyntheticShards`` of ``synthetic_data`` written with a small
  size target, so there are several shards (read-only too).
* ``reduced_demo`` (session): the demo pipeline at its reduced size, its summary and output.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SYNTH_TRAIN, SYNTH_BENCH, SYNTH_SIZE, SYNTH_SEED = 40, 20, 64, 0


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered, even if with an error status
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server at {url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a loopback moto S3 server with dummy credentials in the environment."""
    pytest.importorskip("moto.server")
    from train_harness import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        try:
            _wait_until_up(url, proc)
            for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
                               "AWS_ENDPOINT_URL_S3": url}.items():
                mp.setenv(key, value)
            # A developer's own AWS profile must not leak into (or be used by) the tests.
            mp.delenv("AWS_SESSION_TOKEN", raising=False)
            mp.delenv("AWS_PROFILE", raising=False)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh empty bucket on the loopback server: ``"s3://aov-test-<random>"``."""
    import boto3

    name = f"aov-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"


@dataclass(frozen=True)
class SyntheticData:
    root: Path  # --out of the generator
    train_json: Path  # LLaVA records (Anomaly-Instruct format)
    image_root: Path  # folder the records' image paths are relative to
    benchmark_dir: Path  # VisA-D&R format: detection.json, reasoning.json, VisA/...
    detection_json: Path
    reasoning_json: Path
    num_train: int
    num_bench: int


@dataclass(frozen=True)
class SyntheticShards:
    dir: Path
    manifest_path: Path
    manifest: dict
    data: SyntheticData


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> SyntheticData:
    """A small synthetic data set (40 train records at 64 px, 20 benchmark images), read-only."""
    from aov_dist.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synthetic")
    res = generate(SynthConfig(out=str(root), seed=SYNTH_SEED, num_train=SYNTH_TRAIN,
                               num_bench=SYNTH_BENCH, image_size=SYNTH_SIZE))
    return SyntheticData(root=root, train_json=Path(res.train_json), image_root=Path(res.image_root),
                         benchmark_dir=Path(res.benchmark_dir), detection_json=Path(res.detection_json),
                         reasoning_json=Path(res.reasoning_json), num_train=SYNTH_TRAIN,
                         num_bench=SYNTH_BENCH)


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_data, tmp_path_factory) -> SyntheticShards:
    """Shards of ``synthetic_data`` (about 8 samples per shard, so several shards), read-only."""
    from aov_dist.data.shards import write_shards

    out = tmp_path_factory.mktemp("synthetic_shards")
    manifest = write_shards([str(synthetic_data.train_json)], str(out),
                            image_root=str(synthetic_data.image_root), shard_size_mb=0.1)
    return SyntheticShards(dir=out, manifest_path=out / "manifest.json", manifest=manifest, data=synthetic_data)


@dataclass(frozen=True)
class ReducedDemo:
    summary: Any  # aov_dist.demo.DemoSummary
    printed: str  # what the demo printed


@pytest.fixture(scope="session")
def reduced_demo(tmp_path_factory) -> ReducedDemo:
    """The demo pipeline at its reduced size (conf/demo.yaml), run once per session: its MLflow
    store (both stages, their evaluations) is read by the demo test and the MLflow UI test. GPT-Score
    comes from the stand-in judge (tests/judge_server.py: word overlap with the reference)."""
    import contextlib
    import io

    from aov_dist.demo import run_demo
    from aov_dist.eval.config import JudgeConfig
    from judge_server import JudgeServer, word_overlap_score

    root = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    judge = JudgeServer(default=word_overlap_score)
    try:
        with contextlib.redirect_stdout(printed):
            summary = run_demo("reduced", out_dir=str(root / "out"), data_dir=str(root / "data"),
                               judge=JudgeConfig(base_url=judge.url, model="stand-in", backoff_s=0.0))
    finally:
        judge.close()
    return ReducedDemo(summary, printed.getvalue())


# The 2-core CI box is shared: keep BLAS from spawning threads in every test process.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="module")
def _fresh_ray_per_module():
    """Drivers started in-process (training, the demo) leave Ray connected; modules that start
    their own Ray with other settings need a clean slate."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
