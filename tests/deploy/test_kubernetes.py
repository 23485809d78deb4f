"""deploy/k8s: the overlays render, validate offline against the Kubernetes schemas, and
agree with themselves (probe ports, socket paths, volumes, selectors, grace period)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO
from tests.deploy.kustomize_render import merge_render, render

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.31"  # native sidecars and gRPC probes are GA here
DRAIN_MARGIN_S = 2 + 10  # finals after the grace period, then the engine's stop


def overlay_id(name: str) -> str:
    return f"{name}-overlay"  # a bare "gpu" id would read as the gpu marker (conftest.py)


@pytest.fixture(scope="module", params=OVERLAYS, ids=overlay_id)
def overlay(request) -> tuple[str, list[dict]]:
    resources, _ = render(K8S / "overlays" / request.param)
    return request.param, resources


def one(resources: list[dict], kind: str) -> dict:
    [resource] = [r for r in resources if r["kind"] == kind]
    return resource


def pod_of(resources: list[dict]) -> dict:
    return one(resources, "Deployment")["spec"]["template"]["spec"]


def container(pod: dict, name: str) -> dict:
    [found] = [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name]
    return found


def flag(c: dict, name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in c["args"] if arg.startswith(f"--{name}=")]
    assert len(values) == 1, (c["name"], name, c["args"])
    return values[0]


def env(c: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in c.get("env", [])}


def mounts(c: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}


def test_overlays_validate_against_the_kubernetes_schemas(overlay):
    _, resources = overlay
    assert {r["kind"] for r in resources} == {"Deployment", "Service", "PodDisruptionBudget"}
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_probes_name_ports_their_container_declares(overlay):
    _, resources = overlay
    pod = pod_of(resources)
    for c in pod["containers"] + pod["initContainers"]:
        names = {p["name"] for p in c.get("ports", [])}
        numbers = {p["containerPort"] for p in c.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                continue
            action = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
            port = action["port"]
            assert port in (numbers if isinstance(port, int) else names), (c["name"], kind)
    server = container(pod, "server")
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(server)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[kind]["grpc"]["port"] == int(flag(server, "port"))  # native gRPC probe


def test_sidecars_are_native_and_share_the_control_socket(overlay):
    _, resources = overlay
    pod = pod_of(resources)
    server, memd, gateway = (container(pod, n) for n in ("server", "memd", "gateway"))
    assert memd["restartPolicy"] == gateway["restartPolicy"] == "Always"
    socket = flag(server, "control-socket")
    assert flag(memd, "control") == f"unix://{socket}"
    port_file = flag(server, "port-file")
    assert flag(memd, "pid-file") == port_file
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (socket, port_file):
        directory = path.rsplit("/", 1)[0]
        server_volume, memd_volume = mounts(server).get(directory), mounts(memd).get(directory)
        assert server_volume == memd_volume is not None, path
        assert "emptyDir" in volumes[server_volume]
    for c in (server, memd, gateway):
        for name in mounts(c).values():
            assert name in volumes, (c["name"], name)
    assert flag(gateway, "grpc-target") == f"127.0.0.1:{flag(server, 'port')}"


def test_grace_period_covers_the_drain(overlay):
    _, resources = overlay
    pod = pod_of(resources)
    grace = float(flag(container(pod, "server"), "grace-period"))
    assert pod["terminationGracePeriodSeconds"] >= grace + DRAIN_MARGIN_S


def test_service_and_budget_select_the_pods(overlay):
    _, resources = overlay
    labels = one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service, budget = one(resources, "Service"), one(resources, "PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = pod_of(resources)
    declared = {(p["name"], p["containerPort"])
                for c in pod["containers"] + pod["initContainers"] for p in c.get("ports", [])}
    protocols = {}
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert any(target in pair for pair in declared), port
        protocols[port["name"]] = port["appProtocol"]
    assert protocols["grpc"] == "grpc" and protocols["http"] == "http"


def test_cpu_overlay_watches_the_service_memory_limit():
    pod = pod_of(render(K8S / "overlays" / "cpu")[0])
    server, memd = container(pod, "server"), container(pod, "memd")
    assert env(memd)["AUTOGLM_MEMD_DAEMON_PROBE"] == "host"
    assert pod["shareProcessNamespace"] is True  # the port file's pid is the service's
    limit = server["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert int(env(memd)["AUTOGLM_MEMD_HOST_BUDGET_BYTES"]) == int(limit[:-2]) * 2**30
    assert container(pod, "server")["image"].endswith(":cpu")


def test_gpu_overlay_asks_for_two_gpus_and_watches_them_with_nvml():
    pod = pod_of(render(K8S / "overlays" / "gpu")[0])
    server, memd = container(pod, "server"), container(pod, "memd")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in memd.get("resources", {}).get("limits", {})
    assert env(memd)["AUTOGLM_MEMD_DAEMON_PROBE"] == "nvml"
    assert env(server)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert flag(server, "device") == "auto"
    model_dir = flag(server, "model-dir")
    assert any(model_dir.startswith(path + "/") for path in mounts(server))
    assert server["image"].endswith(":cuda")


@pytest.mark.skipif(not (shutil.which("kustomize") or shutil.which("kubectl")),
                    reason="no kustomize or kubectl to compare the test-side merge with")
@pytest.mark.parametrize("name", OVERLAYS, ids=overlay_id)
def test_the_fallback_merge_renders_what_kustomize_renders(name):
    rendered, _ = render(K8S / "overlays" / name)
    assert unordered(merge_render(K8S / "overlays" / name)) == unordered(rendered)


def unordered(value):
    """Lists of named items (containers, env, volumes, mounts) compared as sets."""
    if isinstance(value, dict):
        return {key: unordered(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [unordered(item) for item in value]
        if all(isinstance(item, dict) for item in items):
            return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
        return items
    return value
