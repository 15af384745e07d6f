"""A test double of the Kubernetes API server, just big enough for the `kubernetes` launcher's tests.

No real API server can run on the test machine, so this serves, on 127.0.0.1 only, the few endpoints the
kubeflow-training `TrainingClient` and the kubernetes client call, and records every request:

    GET    /version
    POST   /api/v1/namespaces/{ns}/configmaps
    POST   /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs          (also "starts" its pods)
    GET    /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs[/{name}]
    DELETE /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}   (and its pods)
    GET    /api/v1/namespaces/{ns}/pods?labelSelector=a=b,c=d
    GET    /api/v1/namespaces/{ns}/pods/{pod}/log

It validates nothing and schedules nothing: it stores what it is sent and serves it back, like etcd behind
an API server with every admission plugin off. Tests set a job's status and its pods' logs directly.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

_JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
_CONFIGMAPS = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
_POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}


class KubeApiStandIn:
    """Start with `start()` (or as a context manager); `url`, `kubeconfig(path)`, `requests`, `jobs`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.pod_logs: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> KubeApiStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with standin._lock:
                    standin.requests.append(Recorded(self.command, url.path, parse_qs(url.query), body))
                    code, payload = standin._route(self.command, url.path, parse_qs(url.query), body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> KubeApiStandIn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path: Path, namespace: str = "motus") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin-token"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                         "namespace": namespace}}]}))
        return path

    # ------------------------------------------------------------------------------------- test controls
    def recorded(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def set_condition(self, namespace: str, name: str, type_: str, start: str | None = None,
                      completion: str | None = None) -> None:
        with self._lock:
            job = self.jobs[(namespace, name)]
            status = job.setdefault("status", {})
            status.setdefault("conditions", []).append(
                {"type": type_, "status": "True", "lastTransitionTime": _now(), "reason": f"PyTorchJob{type_}",
                 "message": f"PyTorchJob {name} is {type_.lower()}."})
            if start:
                status["startTime"] = start
            if completion:
                status["completionTime"] = completion

    # ------------------------------------------------------------------------------------------ routes
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if path in ("/version", "/version/") and method == "GET":
            return 200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-standin", "gitCommit": "standin",
                         "gitTreeState": "clean", "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.22",
                         "compiler": "gc", "platform": "linux/amd64"}
        if m := _CONFIGMAPS.match(path):
            key = (m.group(1), body["metadata"]["name"]) if method == "POST" else None
            if key in self.configmaps:
                return 409, _status(409, "AlreadyExists", f'configmaps "{key[1]}" already exists')
            if key:
                self.configmaps[key] = body
                return 201, body
        if m := _JOBS.match(path):
            return self._jobs(method, m.group(1), m.group(2), body)
        if (m := _PODS.match(path)) and method == "GET":
            wanted = dict(kv.split("=", 1) for kv in (query.get("labelSelector", [""])[0].split(",")) if kv)
            items = [p for (ns, _), p in self.pods.items() if ns == m.group(1)
                     and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        if (m := _POD_LOG.match(path)) and method == "GET":
            if (m.group(1), m.group(2)) not in self.pods:
                return 404, _status(404, "NotFound", f'pods "{m.group(2)}" not found')
            return 200, self.pod_logs.get(m.group(2), "")
        return 404, _status(404, "NotFound", f"the stand-in does not serve {method} {path}")

    def _jobs(self, method: str, ns: str, name: str | None, body: Any) -> tuple[int, Any]:
        if method == "POST" and name is None:
            key = (ns, body["metadata"]["name"])
            if key in self.jobs:
                return 409, _status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{key[1]}" already exists')
            stored = json.loads(json.dumps(body))
            stored["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), namespace=ns)
            self.jobs[key] = stored
            self._start_pods(ns, key[1], stored)
            return 201, stored
        if method == "GET" and name is None:
            items = [j for (n, _), j in self.jobs.items() if n == ns]
            return 200, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJobList", "metadata": {}, "items": items}
        if (ns, name) not in self.jobs:
            return 404, _status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found')
        if method == "GET":
            return 200, self.jobs[(ns, name)]
        if method == "DELETE":
            del self.jobs[(ns, name)]
            for key in [k for k, p in self.pods.items()
                        if p["metadata"]["labels"]["training.kubeflow.org/job-name"] == name]:
                del self.pods[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 405, _status(405, "MethodNotAllowed", method)

    def _start_pods(self, ns: str, name: str, job: dict[str, Any]) -> None:
        # What the operator would create: one pod per replica, labelled the way the SDK looks them up.
        for rtype, rspec in job["spec"]["pytorchReplicaSpecs"].items():
            for i in range(int(rspec.get("replicas", 1))):
                pod = f"{name}-{rtype.lower()}-{i}"
                labels = {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": rtype.lower(),
                          "training.kubeflow.org/replica-index": str(i)}
                if rtype == "Master":
                    labels["training.kubeflow.org/job-role"] = "master"
                self.pods[(ns, pod)] = {"apiVersion": "v1", "kind": "Pod",
                                        "metadata": {"name": pod, "namespace": ns, "labels": labels},
                                        "status": {"phase": "Running"}}
