"""Cluster presets, the node-count override, and the multi-node storage rule."""
from __future__ import annotations

import pytest

from aov_dist.cluster.compose import compose_cluster, presets
from aov_dist import storage
from aov_dist.cluster.config import ClusterConfig, ClusterConfigError, validate_cluster


def test_presets_exist():
    assert {"local", "a100", "h100"} <= set(presets())


@pytest.mark.parametrize("preset,accel", [("a100", "A100"), ("h100", "H100")])
def test_gpu_presets_one_worker_per_gpu_and_nccl(preset, accel):
    cfg = compose_cluster(preset, nodes=4)
    cfg.validate()
    assert (cfg.nodes, cfg.workers_per_node, cfg.gpus_per_node) == (4, 8, 8)
    assert cfg.num_workers == 32
    assert cfg.use_gpu and cfg.backend == "nccl" and cfg.accelerator_type == accel
    assert cfg.cpus_per_worker >= 8
    assert cfg.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert cfg.k8s.tolerations[0]["key"] == "nvidia.com/gpu"


def test_local_preset_and_overrides_compose_like_the_app():
    cfg = compose_cluster("local", nodes=2, overrides=["cluster.workers_per_node=1", "stage=ignored",
                                                       "cluster.shared_filesystem=true"])
    assert (cfg.nodes, cfg.workers_per_node, cfg.num_workers) == (2, 1, 2)
    assert cfg.shared_filesystem is True and cfg.use_gpu is False and cfg.backend == "gloo"


def test_unknown_preset_and_unknown_key_are_named():
    with pytest.raises(ClusterConfigError, match="unknown preset 'v100'"):
        compose_cluster("v100")
    with pytest.raises(ClusterConfigError, match="does not match the ClusterConfig schema"):
        compose_cluster("local", overrides=["+cluster.wokers=3"])


def test_accepts_dictconfig_and_dict():
    from omegaconf import OmegaConf

    dc = OmegaConf.create({"nodes": 3, "workers_per_node": 1})
    assert validate_cluster(dc, "s3://b/p").num_workers == 3
    assert validate_cluster({"nodes": 1}, "ray_results").nodes == 1


@pytest.mark.parametrize("path,remote", [("s3://b/x", True), ("S3://b/x", True), ("/mnt/nfs/x", False),
                                         ("ray_results", False), ("file:///x", False)])
def test_storage_decides_what_is_remote(path, remote):
    assert storage.is_remote(path) is remote


@pytest.mark.parametrize("url", ["gs://b/runs", "az://c/runs", "hdfs://nn/runs"])
def test_a_scheme_storage_cannot_write_is_refused_naming_the_key(url):
    with pytest.raises(ClusterConfigError, match=rf"^train.storage_path: '{url}': the scheme '\w+' is not supported"):
        validate_cluster(ClusterConfig(nodes=2), url, storage_key="train.storage_path")


def test_single_node_allows_local_storage():
    assert validate_cluster(ClusterConfig(nodes=1), "ray_results").nodes == 1


def test_multi_node_local_storage_is_refused_naming_the_key():
    with pytest.raises(ClusterConfigError) as exc:
        validate_cluster(ClusterConfig(nodes=1), "/data/ckpt", num_nodes=2)
    assert exc.value.key == "train.storage_path"
    msg = str(exc.value)
    assert msg.startswith("train.storage_path: '/data/ckpt' is a node-local path but cluster.nodes=2")
    assert "cluster.shared_filesystem=true" in msg and "s3://" in msg


def test_num_nodes_defaults_to_cfg_nodes_and_key_is_configurable():
    with pytest.raises(ClusterConfigError, match=r"^run\.storage: "):
        validate_cluster(ClusterConfig(nodes=2, workers_per_node=1), "ckpt", storage_key="run.storage")


def test_multi_node_remote_or_declared_shared_storage_is_accepted():
    assert validate_cluster(ClusterConfig(nodes=4), "s3://bucket/runs").nodes == 4
    shared = ClusterConfig(nodes=2, shared_filesystem=True)
    assert validate_cluster(shared, "/mnt/nfs/runs").shared_filesystem
    assert validate_cluster(shared, "file:///mnt/nfs/runs").nodes == 2


def test_shared_filesystem_path_must_be_absolute():
    with pytest.raises(ClusterConfigError, match="is relative"):
        validate_cluster(ClusterConfig(nodes=2, shared_filesystem=True), "ray_results")


def test_multi_node_without_storage_is_refused():
    with pytest.raises(ClusterConfigError, match="is empty but cluster.nodes=2"):
        validate_cluster(ClusterConfig(nodes=2), None)


@pytest.mark.parametrize("kwargs,key", [
    ({"nodes": 0}, "cluster.nodes"),
    ({"workers_per_node": 0}, "cluster.workers_per_node"),
    ({"backend": "mpi"}, "cluster.backend"),
    ({"backend": "nccl"}, "cluster.backend"),  # nccl without GPUs
    ({"use_gpu": True, "gpus_per_node": 0, "backend": "nccl"}, "cluster.gpus_per_node"),
    ({"use_gpu": True, "gpus_per_node": 8, "workers_per_node": 4, "backend": "nccl"}, "cluster.workers_per_node"),
    ({"placement_strategy": "RANDOM"}, "cluster.placement_strategy"),
    ({"env": {"NCCL_IB_DISABLE": 1}}, "cluster.env.NCCL_IB_DISABLE"),
])
def test_field_errors_name_the_key(kwargs, key):
    with pytest.raises(ClusterConfigError) as exc:
        validate_cluster(ClusterConfig(**kwargs), "s3://b/p")
    assert exc.value.key == key
    assert str(exc.value).startswith(key + ": ")


def test_compose_keeps_a_callers_hydra_state():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from aov_dist.cluster.compose import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert compose_cluster("h100", 2).num_workers == 16
        assert GlobalHydra.instance().is_initialized()
    assert not GlobalHydra.instance().is_initialized()
    assert compose_cluster("local").num_workers == 2
    assert not GlobalHydra.instance().is_initialized()


def test_ray_scaling_matches_the_cluster_section():
    from aov_dist.cluster.scaling import runtime_env, scaling_config

    cfg = compose_cluster("h100", nodes=2)
    sc = scaling_config(cfg)
    assert sc.num_workers == 16 and sc.use_gpu is True
    assert sc.resources_per_worker == {"CPU": 12.0, "GPU": 1.0}
    assert sc.accelerator_type == "H100" and sc.placement_strategy == "PACK"
    assert runtime_env(cfg)["env_vars"]["NCCL_DEBUG"] == "WARN"
    local = compose_cluster("local", nodes=2, overrides=["cluster.workers_per_node=1"])
    assert scaling_config(local).num_workers == 2 and runtime_env(local) is None
