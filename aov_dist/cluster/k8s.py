"""Render the KubeRay / MLflow manifests for NODES nodes from conf/cluster/<preset>.yaml.

    python -m aov_dist.cluster.k8s --nodes 8 --cluster h100 [--out k8s/rendered] \\
        [--run-name aov-7b-stage2] [--storage s3://bucket/runs] [--image reg/aov-dist:tag] \\
        [overrides...]  [--eval-override KEY=VALUE ...]

Writes ``rayjob-train.yaml``, ``rayjob-eval.yaml``, ``mlflow.yaml`` and ``namespace.yaml``.
Overrides are Hydra overrides composed on the same conf/ tree the training app reads:
``cluster.k8s.*`` ones shape the manifests only, every other one is also appended to the
training entry point (so ``cluster.*`` values agree between Ray and Kubernetes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from aov_dist.cluster import entrypoints as ep
from aov_dist.cluster import k8s_objects as ko
from aov_dist.cluster.compose import REPO_ROOT, compose_cluster
from aov_dist.cluster.config import ClusterConfig, ClusterConfigError, validate_cluster

DEFAULT_OUT = REPO_ROOT / "k8s" / "rendered"
K8S_PREFIX = "cluster.k8s."


def app_overrides(overrides: Sequence[str]) -> list[str]:
    """Overrides meant for the app (everything but the manifest-only cluster.k8s.* keys)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(K8S_PREFIX)]


def pinned_train_overrides(cfg: ClusterConfig) -> list[str]:
    # Fixed run name + storage: a recreated RayJob resumes from the same checkpoint folder. The
    # evaluation watcher RayJob scores every checkpoint: pruning keeps the ones it has not yet.
    return [f"{ep.RUN_NAME_KEY}={cfg.k8s.run_name}", f"{ep.STORAGE_KEY}={cfg.k8s.storage_path}",
            f"{ep.TRACKING_URI_KEY}={ko.tracking_uri(cfg)}", f"{ep.KEEP_UNEVALUATED_KEY}=true"]


def train_entrypoint(preset: str, cfg: ClusterConfig, overrides: Sequence[str]) -> str:
    return ep.as_shell(ep.train_command(preset, cfg.nodes, [*pinned_train_overrides(cfg), *app_overrides(overrides)]))


def eval_entrypoint(preset: str, cfg: ClusterConfig, overrides: Sequence[str],
                    eval_overrides: Sequence[str]) -> str:
    nodes = cfg.k8s.eval_nodes
    cluster_ovr = [o for o in app_overrides(overrides) if o.lstrip("+~").startswith("cluster.")]
    pinned = [f"{ep.TRACKING_URI_KEY}={ko.tracking_uri(cfg)}"]
    return ep.as_shell(ep.eval_watch_command(preset, nodes, nodes * cfg.workers_per_node,
                                             [*pinned, *cluster_ovr, *eval_overrides]))


def render(nodes: int, preset: str, overrides: Sequence[str] = (), eval_overrides: Sequence[str] = (),
           run_name: Optional[str] = None, storage: Optional[str] = None,
           image: Optional[str] = None) -> dict[str, list[dict[str, Any]]]:
    """{file name: [objects]}; raises ClusterConfigError for an unusable combination."""
    extra = list(overrides)
    if run_name:
        extra.append(f"{K8S_PREFIX}run_name={run_name}")
    if storage:
        extra.append(f"{K8S_PREFIX}storage_path={storage}")
    if image:
        extra.append(f"{K8S_PREFIX}image={image}")
    cfg = compose_cluster(preset, nodes, extra)
    validate_cluster(cfg, cfg.k8s.storage_path, nodes, storage_key=f"{K8S_PREFIX}storage_path (--storage)")
    if cfg.k8s.eval_nodes < 1:
        raise ClusterConfigError(f"{K8S_PREFIX}eval_nodes", f"must be >= 1, got {cfg.k8s.eval_nodes}")
    run = ko.dns_name(cfg.k8s.run_name, 28)
    return {
        "namespace.yaml": [ko.namespace(cfg)],
        "mlflow.yaml": ko.mlflow_objects(cfg),
        "rayjob-train.yaml": [ko.ray_job(cfg, f"aov-train-{run}", "train",
                                         train_entrypoint(preset, cfg, overrides), cfg.nodes)],
        "rayjob-eval.yaml": [ko.ray_job(cfg, f"aov-eval-{run}", "eval",
                                        eval_entrypoint(preset, cfg, overrides, eval_overrides), cfg.k8s.eval_nodes)],
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Write repeated sub-objects out in full: anchors (&id001) confuse readers of manifests."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(objs: Sequence[dict[str, Any]]) -> str:
    header = "# Rendered by `python -m aov_dist.cluster.k8s` (make k8s): edit conf/cluster/, not this file.\n"
    return header + yaml.dump_all(list(objs), Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)


def write(rendered: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, objs in rendered.items():
        path = out / name
        path.write_text(dump(objs))
        paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aov_dist.cluster.k8s", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True, help="worker pods = cluster.nodes")
    parser.add_argument("--cluster", default="h100", help="preset in conf/cluster/")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--run-name", default=None, help="cluster.k8s.run_name (fixed: resume key)")
    parser.add_argument("--storage", default=None, help="cluster.k8s.storage_path (s3://...)")
    parser.add_argument("--image", default=None, help="cluster.k8s.image")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for the evaluation watcher's entry point (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (cluster.k8s.* shape the manifests)")
    args = parser.parse_intermixed_args(argv)
    try:
        rendered = render(args.nodes, args.cluster, args.overrides, args.eval_override,
                          args.run_name, args.storage, args.image)
    except ClusterConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in write(rendered, args.out):
        print(f"wrote {path}")
    train = rendered["rayjob-train.yaml"][0]
    print(f"apply: kubectl apply -f {args.out}/namespace.yaml -f {args.out}/mlflow.yaml && "
          f"kubectl apply -f {args.out}/rayjob-train.yaml\n"
          f"follow: kubectl -n {train['metadata']['namespace']} get rayjob {train['metadata']['name']} -w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
