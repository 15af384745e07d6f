"""The policy server on the cluster: the inference overlay renders, validates offline against the Kubernetes
OpenAPI, probes /healthz, and takes what it serves and where the registry is from its ConfigMap."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from motus.config import Settings
from motus.launch import k8s_validate as kv
from motus.serve.deployment import Target

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")


def test_inference_overlay_renders_validates_and_is_configured_by_its_configmap(monkeypatch):
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s/overlays/inference")], check=True,
                         capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    verdicts = kv.validate_documents(docs)
    assert [v.problems for v in verdicts if not v.ok] == []
    assert sorted(v.kind for v in verdicts) == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    assert {d["metadata"]["namespace"] for d in docs} == {"motus"}

    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}  # the inference pool
    (main,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the Service reaches the pods, on the port the container serves
    service = next(d for d in docs if d["kind"] == "Service")
    assert all(deploy["spec"]["template"]["metadata"]["labels"].get(k) == v
               for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] == main["ports"][0]["name"]

    # the ConfigMap the container reads (by its hashed name) says what to serve and where the registry is
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    assert main["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    env = configmap["data"]
    target = Target.parse(env["MOTUS_SERVE_TARGET"])
    assert (target.name, target.alias) == ("motus-aloha", "champion")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.tracking_uri == env["MOTUS_TRACKING_URI"].strip()
    assert settings.serve_device == "cuda" and settings.serve_poll_s == 10.0
    assert str(settings.serve_cache_dir) == main["volumeMounts"][0]["mountPath"]
    # the command serves that target, listening beyond the pod's loopback on the probed port
    command = shlex.split(main["command"][2])
    assert command[:4] == ["exec", "motus", "serve", "$MOTUS_SERVE_TARGET"]
    assert "--host" in command and command[command.index("--host") + 1] == "0.0.0.0"
    assert int(command[command.index("--port") + 1]) == main["ports"][0]["containerPort"]
