"""A real MLflow tracking server for tests, in the production topology: a PostgreSQL backend store
(the machine's server on 127.0.0.1:5432, trust authentication; a database of its own, dropped
afterwards) and artifacts proxied to S3 (the loopback moto server). It can be killed and started
again on the same port and store, as a crashed server restarted by Kubernetes would be."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server; yields its SQLAlchemy URI."""
    import psycopg

    name = f"aov_mlflow_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        raise RuntimeError(
            f"PostgreSQL is not reachable at 127.0.0.1:5432 ({e}). The MLflow production-topology tests "
            f"need it (trust authentication for user postgres); start it with "
            f"`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`") from e
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


class MlflowServer:
    """``mlflow server`` with ``store_uri`` and S3 artifacts at ``artifacts``; ``url`` once started."""

    def __init__(self, store_uri: str, artifacts: str, s3_endpoint: str, log_dir: Path, port: int):
        self.store_uri, self.artifacts, self.port = store_uri, artifacts, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir = log_dir
        self.env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self, timeout_s: float = 120.0) -> None:
        self.starts += 1
        log = open(self.log_dir / f"mlflow-server-{self.starts}.log", "wb")
        mlflow = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", self.store_uri, "--artifacts-destination", self.artifacts,
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server at {self.url} not healthy within {timeout_s} s; see {log.name}")

    def kill(self) -> None:
        """SIGKILL the server and its workers (a crash: nothing is shut down cleanly)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
