"""deploy/kubernetes/: nothing here runs Kubernetes, so the manifests are parsed and checked:
required fields, the checkpoint mounted read-only at the path the settings name, readiness on
/health, every THAWED_* a real setting, the RayService's Serve config a valid thawed application
(built for real when Ray is installed), images built by docker/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from thawed.server.cluster.proxy import CALLBACK_ENV, CALLBACK_PATH
from thawed.server.cluster.settings import ClusterSettings
from thawed.server import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
SETTINGS = set(Settings.model_fields) | set(ClusterSettings.model_fields)
IMAGES = {"thawed:cpu": "Dockerfile.cpu", "thawed:cuda": "Dockerfile",
          "thawed:cluster-cpu": "Dockerfile.cpu", "thawed:cluster-cuda": "Dockerfile"}


def docs(name: str) -> list[dict]:
    out = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    for d in out:
        assert {"apiVersion", "kind", "metadata"} <= set(d), (name, d.keys())
        assert d["metadata"]["name"]
    return out


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]["spec"]]
    cluster = doc["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def check_pod(spec: dict, *, ray: bool) -> None:
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    volumes = {v["name"]: v for v in spec["volumes"]}
    (container,) = spec["containers"]
    assert container["image"] in IMAGES and (ROOT / "docker" / IMAGES[container["image"]]).is_file()
    assert container["image"].startswith("thawed:cluster-") == ray  # Ray pods need the image built with EXTRAS=cluster
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    ckpt = mounts["/model"]
    assert ckpt["readOnly"] is True
    claim = volumes[ckpt["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True and claim["claimName"] == "thawed-checkpoint"
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert all(isinstance(v, str) for v in env.values()), "env values must be strings (quote numbers)"
    thawed = {k[len("THAWED_"):].lower() for k in env if k.startswith("THAWED_")}
    assert thawed <= SETTINGS, thawed - SETTINGS
    if ray:
        assert env[CALLBACK_ENV] == CALLBACK_PATH


def test_checkpoint_claim():
    (pvc,) = docs("checkpoint-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "thawed-checkpoint"
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"] and pvc["spec"]["resources"]["requests"]["storage"]


def test_plain_deployment_and_service():
    deployment, service = docs("deployment.yaml")
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    (spec,) = pod_specs(deployment)
    check_pod(spec, ray=False)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["THAWED_CHECKPOINT"] == "/model" and env["THAWED_HOST"] == "0.0.0.0"
    assert int(env["THAWED_PORT"]) == ports["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", ports["http"]), probe
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in ("http", ports["http"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("name", ["rayservice-cpu.yaml", "rayservice-cuda.yaml"])
def test_rayservice(name):
    (svc,) = docs(name)
    assert svc["kind"] == "RayService" and svc["apiVersion"] == "ray.io/v1"
    cluster = svc["spec"]["rayClusterConfig"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", cluster["rayVersion"])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    for spec in pod_specs(svc):
        check_pod(spec, ray=True)
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert serve["http_options"]["port"] == 8000
    (app,) = serve["applications"]
    assert app["import_path"] == "thawed.server.cluster.deployment:build_app" and app["route_prefix"] == "/"
    args = app["args"]
    assert set(args) <= SETTINGS and args["checkpoint"] == "/model"
    cluster_args = ClusterSettings(**{k: v for k, v in args.items() if k in ClusterSettings.model_fields})
    settings = Settings(**{k: v for k, v in args.items() if k in Settings.model_fields})
    from thawed.server.cluster.settings import deployment_options

    opts = deployment_options(cluster_args, settings)  # a CUDA replica must reserve a GPU, etc.
    workers = cluster["workerGroupSpecs"]
    if settings.device.startswith("cuda"):
        for group in workers:
            (container,) = group["template"]["spec"]["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= opts["ray_actor_options"]["num_gpus"]
    most = opts.get("num_replicas") or opts["autoscaling_config"]["max_replicas"]
    room = 0
    for group in workers:  # the worker pods can hold every replica Serve may ask for
        (container,) = group["template"]["spec"]["containers"]
        per_pod = int(float(container["resources"]["requests"]["cpu"]) // opts["ray_actor_options"]["num_cpus"])
        room += per_pod * group["maxReplicas"]
    assert room >= most, (room, most)


def test_rayservice_builds_the_application_when_ray_is_installed():
    pytest.importorskip("ray.serve", reason="the cluster extra is not installed")
    from ray.serve import Application

    from thawed.server.cluster.deployment import build_app

    for name in ("rayservice-cpu.yaml", "rayservice-cuda.yaml"):
        (svc,) = docs(name)
        (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        assert isinstance(build_app(app["args"]), Application)
    with pytest.raises(ValueError, match="unknown thawed setting"):
        build_app({"checkpoint": "/model", "replicas": 2})
