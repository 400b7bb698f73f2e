"""`make mlflow-ui`: the MLflow UI on a tracking store, opening on the training runs.

Prints the address of every experiment's training-runs view (the UI would otherwise open on its
GenAI overview), then becomes the MLflow server (``mlflow server``: UI, REST API and artifacts).

    python -m aov_dist.tracking.ui --backend-store-uri sqlite:///demo_out/mlflow.db --port 5000
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

from aov_dist.tracking.run_info import training_runs_url


def experiment_urls(store_uri: str, base_url: str) -> list[tuple[str, str]]:
    """(experiment name, training-runs URL) of every experiment holding runs, newest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri)
    out = []
    for exp in client.search_experiments(order_by=["last_update_time DESC"]):
        if client.search_runs([exp.experiment_id], max_results=1):
            out.append((exp.name, training_runs_url(base_url, exp.experiment_id)))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend-store-uri", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    base = f"http://{args.host}:{args.port}"
    store = args.backend_store_uri
    if store.startswith("sqlite:///") and not os.path.exists(store[len("sqlite:///"):]):
        print(f"{store[len('sqlite:///'):]} does not exist yet: run `make demo` (or a training job) first; "
              f"serving an empty store", flush=True)
    else:
        urls = experiment_urls(store, base)
        for name, url in urls:
            print(f"MLflow: training runs of {name}: {url}", flush=True)
        if not urls:
            print(f"MLflow: no runs in {store} yet; the UI is at {base}", flush=True)
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    os.execv(mlflow, [mlflow, "server", "--backend-store-uri", store, "--host", args.host,
                      "--port", str(args.port)])


if __name__ == "__main__":
    main()
