"""KubeRay manifests: counts follow NODES, entry point = training entry point, no secret values,
and the RayJobs validate against KubeRay's published v1 CRD schema (../shared/kuberay)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aov_dist.cluster import entrypoints as ep
from aov_dist.cluster import k8s, k8s_objects as ko
from aov_dist.cluster.config import ClusterConfigError

ROOT = Path(__file__).resolve().parents[1]
# CI keeps shared/ beside the clone; the CRDs are never copied into the repo.
KUBERAY = ROOT.parent / "shared" / "kuberay"
STORAGE = "s3://aov-test-bucket/runs"
FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEACCESSKEY123", "AWS_SECRET_ACCESS_KEY": "fake/secret+KEY9876",
                "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pw-5531", "MLFLOW_TRACKING_USERNAME": "fake-user-8842",
                "MLFLOW_BACKEND_STORE_URI": "postgresql://aov:fake-pg-pw-7719@db:5432/mlflow"}


def _render(nodes: int, preset: str = "h100", overrides=(), **kw) -> dict[str, list[dict[str, Any]]]:
    return k8s.render(nodes, preset, list(overrides), storage=STORAGE, run_name="aov-7b-s2", **kw)


def _worker_group(job: dict) -> dict:
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_objects_are_complete_and_counts_follow_nodes(nodes):
    rendered = _render(nodes)
    assert set(rendered) == {"namespace.yaml", "mlflow.yaml", "rayjob-train.yaml", "rayjob-eval.yaml"}
    for name, objs in rendered.items():
        for obj in yaml.safe_load_all(k8s.dump(objs)):  # valid YAML, round-trips
            assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], name
    (train,) = rendered["rayjob-train.yaml"]
    group = _worker_group(train)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == nodes
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert train["metadata"]["labels"]["aov-dist/nodes"] == str(nodes)
    # The eval watcher has its own (default 1-node) worker group.
    assert _worker_group(rendered["rayjob-eval.yaml"][0])["replicas"] == 1


@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_train_entrypoint_is_the_training_entry_point(nodes):
    (train,) = _render(nodes, overrides=["stage=stage2", "cluster.k8s.image=reg/aov:1"])["rayjob-train.yaml"]
    expected = ep.as_shell(ep.train_command("h100", nodes, [
        "train.run_name=aov-7b-s2", f"train.storage_path={STORAGE}",
        "tracking.uri=http://aov-mlflow.aov.svc.cluster.local:5000", "train.keep_unevaluated=true", "stage=stage2"]))
    assert train["spec"]["entrypoint"] == expected
    assert train["spec"]["entrypoint"].startswith(f"python -m aov_dist.train cluster=h100 cluster.nodes={nodes} ")
    assert _worker_group(train)["template"]["spec"]["containers"][0]["image"] == "reg/aov:1"


def test_eval_entrypoint_is_the_watcher_on_its_gpus():
    (job,) = _render(2, eval_overrides=["eval.max_idle_polls=30"])["rayjob-eval.yaml"]
    assert job["spec"]["entrypoint"] == ("python -m aov_dist.eval mode=watch cluster=h100 cluster.nodes=1 "
                                         "eval.num_workers=8 tracking.uri=http://aov-mlflow.aov.svc.cluster.local:5000 "
                                         "eval.max_idle_polls=30")


def test_run_name_is_fixed_in_names_labels_and_lifecycle_fields():
    (train,) = _render(2)["rayjob-train.yaml"]
    assert train["metadata"]["name"] == "aov-train-aov-7b-s2"
    assert train["metadata"]["labels"]["aov-dist/run-name"] == "aov-7b-s2"
    spec = train["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600 and spec["activeDeadlineSeconds"] == 259200
    assert spec["backoffLimit"] == 2


def test_shm_tolerations_node_selector_and_head_without_workers():
    (train,) = _render(2, overrides=["cluster.k8s.shm_size=100Gi"])["rayjob-train.yaml"]
    pod = _worker_group(train)["template"]["spec"]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "100Gi"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    head = train["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # NCCL settings of the preset reach every pod.
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_credentials_only_as_secret_refs_and_no_secret_value_in_any_manifest(monkeypatch, tmp_path):
    for k, v in FAKE_SECRETS.items():
        monkeypatch.setenv(k, v)
    proc = subprocess.run([sys.executable, "-m", "aov_dist.cluster.k8s", "--nodes", "2", "--cluster", "h100",
                           "--storage", STORAGE, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("*.yaml"))
    assert [f.name for f in files] == ["mlflow.yaml", "namespace.yaml", "rayjob-eval.yaml", "rayjob-train.yaml"]
    text = "\n".join(f.read_text() for f in files)
    for value in FAKE_SECRETS.values():
        assert value not in text
    assert "kind: Secret\n" not in text
    objs = [o for f in files for o in yaml.safe_load_all(f.read_text())]
    refs = ko.secret_refs(objs)
    assert ("aov-s3", "AWS_SECRET_ACCESS_KEY") in refs
    assert ("aov-mlflow-server", "backend-store-uri") in refs
    assert ("aov-mlflow-client", "MLFLOW_TRACKING_PASSWORD") in refs
    # Every credential-named variable of every container comes from a Secret, never a literal.
    for obj in objs:
        for env in _all_envs(obj):
            if any(w in env["name"] for w in ("SECRET", "PASSWORD", "ACCESS_KEY", "BACKEND_STORE_URI", "USERNAME")):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def _all_envs(obj: Any):
    if isinstance(obj, dict):
        if "env" in obj and isinstance(obj["env"], list):
            yield from obj["env"]
        for v in obj.values():
            yield from _all_envs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_envs(v)


def test_mlflow_server_reads_store_from_secret_and_serves_s3_artifacts():
    deployment, service = _render(1)["mlflow.yaml"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "aov-mlflow-server",
                                                                           "key": "backend-store-uri"}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert "--serve-artifacts" in c["args"]
    assert "aov-mlflow.aov.svc.cluster.local:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 5000


def test_multi_node_render_refuses_local_storage():
    with pytest.raises(ClusterConfigError, match=r"^cluster.k8s.storage_path \(--storage\): '/data' is a node-local"):
        k8s.render(2, "h100", storage="/data")


# ---------- validation against KubeRay's CRD schema ----------

def _strict(schema: Any) -> Any:
    """openAPIV3Schema -> JSON Schema that, like the API server, rejects unknown fields.

    x-kubernetes-int-or-string becomes anyOf integer|string; nullable adds null; objects with
    declared properties get additionalProperties: false unless x-kubernetes-preserve-unknown-fields.
    CEL rules (x-kubernetes-validations) cannot be evaluated here and are dropped.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _validator(kind_file: str):
    if not KUBERAY.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (CI provides ../shared/kuberay beside the clone)")
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB: the C loader is ~10x faster
    crd = yaml.load((KUBERAY / kind_file).read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rayjob_validator():
    return _validator("ray.io_rayjobs.yaml")


@pytest.mark.parametrize("nodes", [1, 2, 8])
@pytest.mark.parametrize("preset", ["h100", "a100", "local"])
def test_rayjobs_validate_against_kuberay_crd(rayjob_validator, nodes, preset):
    storage_ovr = [] if nodes == 1 or preset != "local" else ["cluster.shared_filesystem=true",
                                                               "cluster.k8s.storage_path=/mnt/nfs/runs"]
    rendered = k8s.render(nodes, preset, storage_ovr, storage=None if storage_ovr else STORAGE)
    for name in ("rayjob-train.yaml", "rayjob-eval.yaml"):
        for obj in yaml.safe_load_all(k8s.dump(rendered[name])):
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in rayjob_validator.iter_errors(obj)]
            assert not errors, f"{name} (nodes={nodes}, {preset}): {errors[:5]}"


def test_schema_check_catches_typos_and_wrong_types(rayjob_validator):
    (train,) = _render(2)["rayjob-train.yaml"]
    typo = copy.deepcopy(train)
    group = _worker_group(typo)
    group["replica"] = group.pop("replicas")
    assert any("'replica' was unexpected" in e.message for e in rayjob_validator.iter_errors(typo))
    wrong = copy.deepcopy(train)
    _worker_group(wrong)["maxReplicas"] = "8"
    assert any(e.validator == "type" for e in rayjob_validator.iter_errors(wrong))
    missing = copy.deepcopy(train)
    del _worker_group(missing)["groupName"]
    assert any("'groupName' is a required property" in e.message for e in rayjob_validator.iter_errors(missing))
