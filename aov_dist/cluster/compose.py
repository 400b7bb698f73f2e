"""Compose the cluster section from conf/cluster/<preset>.yaml with Hydra's compose API.

Used by the launcher and the manifest renderer so that they read the very files the training
app reads (`cluster=<preset> cluster.nodes=<n>` on the same conf/ tree).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from aov_dist.cluster.config import ClusterConfig, ClusterConfigError, to_cluster_config

from aov_dist import CONF_DIR as _CONF_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]  # the working directory a submitted job uploads
CONF_DIR = Path(_CONF_DIR)
_SCHEMA_NAME = "aov_cluster_only_schema"


@dataclass
class _ClusterOnly:
    """A root holding only the typed cluster section: the group file is merged onto the schema
    (as in the apps), so overrides of keys the YAML leaves out (cluster.k8s.image=...) work."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"cluster": "local"}])
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def presets(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "cluster").glob("*.yaml"))


def cluster_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that touch the cluster section (`cluster.x=...`, `~cluster.x`, `+cluster.x=...`)."""
    return [o for o in overrides if o.lstrip("+~").startswith("cluster.")]


def compose_cluster(preset: str, nodes: Optional[int] = None, overrides: Sequence[str] = (),
                    conf_dir: Path = CONF_DIR) -> ClusterConfig:
    """The typed ClusterConfig of `cluster=<preset> [cluster.nodes=<n>] <cluster.* overrides>`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    if preset not in presets(conf_dir):
        raise ClusterConfigError("cluster", f"unknown preset {preset!r}: expected one of {presets(conf_dir)} "
                                 f"(files in {conf_dir / 'cluster'})")
    ConfigStore.instance().store(name=_SCHEMA_NAME, node=_ClusterOnly)
    ovr = [f"cluster={preset}", *cluster_overrides(overrides)]
    if nodes is not None:
        ovr.append(f"cluster.nodes={nodes}")
    # A caller's own Hydra app may be initialised: compose in a fresh global state, then put
    # the caller's state back.
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            composed = compose(config_name=_SCHEMA_NAME, overrides=ovr)
        return to_cluster_config(OmegaConf.to_container(composed.cluster, resolve=True))
    except Exception as exc:  # unknown key or wrong type in the YAML or an override
        raise ClusterConfigError("cluster", f"conf/cluster/{preset}.yaml with overrides {list(ovr[1:])} "
                                 f"does not match the ClusterConfig schema: {exc}") from exc
    finally:
        restore_gh_from_backup(backup)
