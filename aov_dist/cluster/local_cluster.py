"""A real multi-node Ray cluster on one machine: a head and N-1 more nodes, each its own `ray start`.

    python -m aov_dist.cluster.local_cluster up   --root /tmp/aov-cluster --nodes 2
    python -m aov_dist.cluster.local_cluster down --root /tmp/aov-cluster

Every node is a separate raylet with its own node id, 1 CPU by default and a custom resource
``aov_node_<i>`` so work can be pinned to it. All of its processes keep the node's own
``--temp-dir`` (under ``root``) on their command line; teardown kills exactly those processes
and their descendants (the job drivers) by pid. It never runs ``ray stop``, which would kill
every Ray process on the machine, other users' included. The address file Ray writes for
``ray.init()`` also stays under ``root``, so other Ray programs on the machine never join this
cluster by accident. The dashboard (needed by the Jobs API) listens on 127.0.0.1 only; token
authentication is off (RAY_AUTH_MODE=disabled), acceptable for a throw-away one-machine demo.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

STATE_FILE = "cluster.json"
HOST = "127.0.0.1"


@dataclass
class LocalCluster:
    root: str
    gcs_address: str
    dashboard_url: str
    node_dirs: list[str] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return Path(self.root) / STATE_FILE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ray_bin() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def _node_args(temp_dir: Path, index: int, num_cpus: int, object_store_mb: int) -> list[str]:
    # Each raylet on the same host needs its own set of ports; worker ports 0 = chosen by the OS.
    return [
        "--node-ip-address", HOST, "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--resources", json.dumps({f"aov_node_{index}": 1}),
        "--temp-dir", str(temp_dir), "--object-store-memory", str(object_store_mb * 1024 * 1024),
        "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
    ]


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def wait_for_dashboard(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray dashboard (Jobs API) at {url} did not answer within {timeout_s:.0f} s")
        time.sleep(1.0)


def start(root: Path, nodes: int = 2, cpus_per_node: int = 1, object_store_mb: int = 128,
          env: Optional[dict[str, str]] = None) -> LocalCluster:
    """Start a head and ``nodes - 1`` more nodes under ``root``; return where to reach them."""
    root = Path(root).resolve()
    if (root / STATE_FILE).exists():
        raise RuntimeError(f"{root / STATE_FILE} exists: a cluster may still be running; "
                           f"run `python -m aov_dist.cluster.local_cluster down --root {root}` first")
    root.mkdir(parents=True, exist_ok=True)
    # Explicit auth mode: with it unset, a head finding ~/.ray/auth_token (written by any earlier
    # local ray.init()) turns token auth on while the other nodes do not, and they cannot join.
    # The cluster listens on 127.0.0.1 only.
    run_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {}), "RAY_USAGE_STATS_ENABLED": "0"}
    # The job entry point runs `python ...`: make it this interpreter (the project's venv).
    run_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{run_env.get('PATH', '')}"
    run_env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = _free_port(), _free_port()
    cluster = LocalCluster(root=str(root), gcs_address=f"{HOST}:{gcs_port}",
                           dashboard_url=f"http://{HOST}:{dash_port}")
    # Record the state before starting anything, so `down` can clean up after a failed `up`.
    node_dirs = [root / ("head" if i == 0 else f"node{i}") for i in range(nodes)]
    cluster.node_dirs = [str(d) for d in node_dirs]
    cluster.state_path.write_text(json.dumps(asdict(cluster), indent=2))
    try:
        head = [_ray_bin(), "start", "--head", "--port", str(gcs_port),
                "--dashboard-host", HOST, "--dashboard-port", str(dash_port), "--include-dashboard", "true",
                "--ray-client-server-port", str(_free_port()),
                *_node_args(node_dirs[0], 0, cpus_per_node, object_store_mb)]
        _run(head, run_env, "ray start --head")
        for i in range(1, nodes):
            _run([_ray_bin(), "start", "--address", cluster.gcs_address,
                  *_node_args(node_dirs[i], i, cpus_per_node, object_store_mb)], run_env, f"ray start (node {i})")
        wait_for_dashboard(cluster.dashboard_url)
    except BaseException:
        stop(root)
        raise
    return cluster


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                # the command name (field 2) may hold spaces: parse after its closing parenthesis
                out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def cluster_pids(root: Path) -> list[int]:
    """Pids of every process of this cluster: command line names one of its node dirs, plus descendants."""
    state = json.loads((Path(root) / STATE_FILE).read_text())
    markers = [str(d) for d in state["node_dirs"]]
    # The Ray client server names no folder, only the head's GCS address (with the node's IP).
    gcs = re.compile(r"--address=\S+:%s(\s|$)" % re.escape(state["gcs_address"].rsplit(":", 1)[1]))
    parents = _parents()
    own = {pid for pid in parents if pid != os.getpid()
           and (any(m in _cmdline(pid) for m in markers) or gcs.search(_cmdline(pid)))}
    changed = True
    while changed:  # add descendants (job drivers, Train workers spawned by Ray workers)
        new = {pid for pid, ppid in parents.items() if ppid in own and pid not in own and pid != os.getpid()}
        own |= new
        changed = bool(new)
    return sorted(own)


def stop(root: Path, grace_s: float = 10.0) -> list[int]:
    """Kill (by pid) every process of the cluster under ``root``; return the pids signalled."""
    root = Path(root).resolve()
    if not (root / STATE_FILE).exists():
        return []
    pids = cluster_pids(root)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.2)
    (root / STATE_FILE).unlink(missing_ok=True)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def load(root: Path) -> LocalCluster:
    return LocalCluster(**json.loads((Path(root) / STATE_FILE).read_text()))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aov_dist.cluster.local_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--root", default=os.environ.get("AOV_CLUSTER_ROOT", "/tmp/aov-cluster"),
                        help="folder holding every node's Ray temp dir (keep it short: Unix socket paths)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.action == "up":
        c = start(root, args.nodes, args.cpus_per_node)
        print(f"Ray cluster up: {args.nodes} nodes x {args.cpus_per_node} CPU, state in {c.state_path}")
        print(f"export RAY_ADDRESS={c.dashboard_url}")
        print(f"Stop it with: python -m aov_dist.cluster.local_cluster down --root {c.root}")
    elif args.action == "down":
        pids = stop(root)
        print(f"stopped {len(pids)} processes of the cluster under {root.resolve()}" if pids
              else f"no cluster state under {root.resolve()}: nothing to stop")
    else:
        if not (root / STATE_FILE).exists():
            print(f"no cluster under {root.resolve()}")
            return 1
        c = load(root)
        print(json.dumps({**asdict(c), "pids": cluster_pids(root)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
