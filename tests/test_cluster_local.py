"""Teardown of the one-machine cluster is scoped: it finds exactly the processes whose command
line names the cluster's node folders (or its GCS port), plus their descendants."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from aov_dist.cluster import local_cluster


def _state(root: Path, node_dirs: list[Path], gcs_port: int = 1) -> None:
    (root / local_cluster.STATE_FILE).write_text(json.dumps({
        "root": str(root), "gcs_address": f"127.0.0.1:{gcs_port}", "dashboard_url": "http://127.0.0.1:2",
        "node_dirs": [str(d) for d in node_dirs]}))


def test_stop_kills_marked_processes_and_descendants_only(tmp_path):
    node = tmp_path / "head"
    # A "raylet" naming the node dir that spawns a child (a job driver) not naming it.
    script = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(300)']); time.sleep(300)"
    marked = subprocess.Popen([sys.executable, "-c", script, f"--session_dir={node}/session_x"])
    client = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "--address=10.0.0.1:47123"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(tmp_path / "other")])
    try:
        _state(tmp_path, [node], gcs_port=47123)
        deadline = time.monotonic() + 10
        while len(pids := local_cluster.cluster_pids(tmp_path)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # the grandchild needs a moment to start
        assert marked.pid in pids and client.pid in pids and bystander.pid not in pids
        assert len(pids) == 3  # marked + its child + the client server
        stopped = local_cluster.stop(tmp_path, grace_s=5)
        assert sorted(stopped) == sorted(pids)
        assert marked.wait(5) is not None and client.wait(5) is not None
        assert not any(local_cluster._alive(p) for p in pids)
        assert bystander.poll() is None
        assert not (tmp_path / local_cluster.STATE_FILE).exists()
    finally:
        for p in (marked, client, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_stop_without_state_is_a_no_op(tmp_path):
    assert local_cluster.stop(tmp_path) == []


def test_up_refuses_when_state_exists(tmp_path):
    _state(tmp_path, [tmp_path / "head"])
    try:
        local_cluster.start(tmp_path)
    except RuntimeError as exc:
        assert "a cluster may still be running" in str(exc)
    else:
        raise AssertionError("start() should refuse an existing state file")
