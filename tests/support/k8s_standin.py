"""A stand-in Kubernetes cluster: an API server on 127.0.0.1 and a Training Operator v1.9 that runs the pods.

No real API server can run on the test machine, so this serves the paths the kubeflow-training
`TrainingClient` and the kubernetes client call, records every request, and, with `run_pods=True`, does what
the operator and the kubelet would do with a PyTorchJob:

    GET    /version
    POST   /api/v1/namespaces/{ns}/configmaps | secrets              GET .../{name}
    POST   /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs          (validated like `motus k8s validate`)
    GET    /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs[/{name}]
    DELETE /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}   (kills its pods' processes)
    GET    /api/v1/namespaces/{ns}/pods?labelSelector=a=b,c=d
    GET    /api/v1/namespaces/{ns}/pods/{pod}/log[?follow=true&previous=true]
    GET    /api/v1/namespaces/{ns}/events

What a pod is here: each replica's container command, run as a local process group (`python` = the
interpreter of the image, `images`), with the image's environment, the env the operator injects (MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, RANK, PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT), the container's env with Secret refs resolved from the stand-in's Secrets, and its volumes:
a PersistentVolumeClaim is a local folder (`volumes`), a ConfigMap its files, an emptyDir a fresh folder. The
mount paths in the command, env and working directory are rewritten to those folders (the one thing a
container's mount namespace does that a process cannot). Init containers run first; one with
`restartPolicy: Always` is a native sidecar, stopped with SIGTERM when the main container ends.

The operator's rules: the job is Created, Suspended while Kueue holds its queue (`hold`/`release`), Running
once its pods run, Succeeded when the Master exits 0 (running Workers are then deleted), Failed when a pod
fails for good (restartPolicy ExitCode: exit codes 1-127 are permanent, 128-255, signals and evictions are
retried) or after `backoffLimit` restarts, Restarting while a pod is recreated. `evict(pod)` is a preemption:
SIGTERM, then SIGKILL after the grace period, reason Evicted. A pod whose image is unknown waits in
ErrImagePull, one whose Secret or volume is missing in CreateContainerConfigError / Pending, as on a cluster.

What it does not prove: scheduling onto real nodes, GPUs, NCCL, DNS between pods (all pods share 127.0.0.1),
networking policies, RBAC, image pulls, a real Kueue's quota arithmetic, the real operator's timing.
With `run_pods=False` it only records and stores (tests then set conditions by hand).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from motus.launch.local import free_port as _free_port

_JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
_CORE = re.compile(r"^/api/v1/namespaces/([^/]+)/(configmaps|secrets)(?:/([^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
_POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
_EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_LABEL = "training.kubeflow.org/job-name"


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


@dataclass
class Image:
    """What a container image is on this machine: its interpreter (`python` in a command) and its ENV lines."""

    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class PodRun:
    """One replica's pod: its current process (main container), sidecars, log files and restart count."""

    ns: str
    name: str
    job: str
    rtype: str
    index: int
    folder: Path
    proc: subprocess.Popen | None = None
    sidecars: list[subprocess.Popen] = field(default_factory=list)
    restarts: int = 0
    evicted: bool = False
    deleted: bool = False

    @property
    def log(self) -> Path:
        return self.folder / f"log.{self.restarts}"


class KubeApiStandIn:
    """Start with `start()` (or as a context manager); `url`, `kubeconfig(path)`, `requests`, `jobs`, `pods`.

    `volumes`: PersistentVolumeClaim name -> local folder. `images`: image -> `Image` (unknown images do not
    pull). `grace_s`: terminationGracePeriodSeconds for deletes and evictions."""

    def __init__(self, *, run_pods: bool = False, volumes: dict[str, Path] | None = None,
                 images: dict[str, Image] | None = None, grace_s: float = 5.0) -> None:
        self.run_pods, self.volumes, self.images, self.grace_s = run_pods, dict(volumes or {}), dict(images or {}), grace_s
        self.requests: list[Recorded] = []
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.pod_logs: dict[str, str] = {}  # set by tests of the recording mode
        self.events: list[dict[str, Any]] = []
        self.held: set[str] = set()
        self._runs: dict[tuple[str, str], PodRun] = {}
        self._ports: dict[tuple[str, str], int] = {}  # the Master's rendezvous port per job
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._root = Path(tempfile.mkdtemp(prefix="motus-k8s-"))
        self._crd: dict | None = None

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> KubeApiStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with standin._lock:
                    standin.requests.append(Recorded(self.command, url.path, query, body))
                if (m := _POD_LOG.match(url.path)) and _flag(query, "follow"):
                    return standin._follow(self, m.group(1), m.group(2))
                with standin._lock:
                    code, payload = standin._route(self.command, url.path, query, body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._kill(run, grace=1.0)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self._root, ignore_errors=True)

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

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        with self._lock:
            self.secrets[(namespace, name)] = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                               "metadata": {"name": name, "namespace": namespace},
                                               "stringData": dict(data)}

    def hold(self, queue: str) -> None:
        """Kueue keeps every job of `queue` suspended (no quota) until `release`."""
        with self._lock:
            self.held.add(queue)

    def release(self, queue: str) -> None:
        with self._lock:
            self.held.discard(queue)
            waiting = [(ns, n) for (ns, n), j in self.jobs.items()
                       if j["metadata"].get("labels", {}).get(QUEUE_LABEL) == queue and self._suspended(j)]
        for ns, name in waiting:
            self._admit(ns, name)

    def evict(self, namespace: str, pod: str, grace_s: float | None = None) -> None:
        """Preempt one pod, as a node drain or a spot reclaim does: SIGTERM, then SIGKILL after the grace."""
        with self._lock:
            run = self._runs[(namespace, pod)]
            run.evicted = True
            self._event(namespace, "Pod", pod, "Warning", "Evicted", "The node was drained (preemption).")
        self._kill(run, grace=self.grace_s if grace_s is None else grace_s)

    def state(self, namespace: str, name: str) -> str:
        job = self.jobs.get((namespace, name))
        conds = [c for c in ((job or {}).get("status") or {}).get("conditions", []) if c.get("status") == "True"]
        return conds[-1]["type"] if conds else "Pending"

    def wait_for(self, namespace: str, name: str, states: tuple[str, ...], timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (st := self.state(namespace, name)) in states:
                return st
            time.sleep(0.1)
        raise TimeoutError(f"PyTorchJob {namespace}/{name} still {self.state(namespace, name)} after {timeout}s")

    def set_condition(self, namespace: str, name: str, type_: str, start: str | None = None,
                      completion: str | None = None, reason: str | None = None, message: str | None = None) -> None:
        with self._lock:
            job = self.jobs[(namespace, name)]
            status = job.setdefault("status", {})
            for c in status.setdefault("conditions", []):
                if c["status"] == "True" and c["type"] in ("Running", "Restarting", "Suspended"):
                    c["status"] = "False"  # the operator keeps one current phase true
            status["conditions"].append(
                {"type": type_, "status": "True", "lastTransitionTime": _now(),
                 "reason": reason or f"PyTorchJob{type_}", "message": message or f"PyTorchJob {name} is {type_.lower()}."})
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
        if m := _CORE.match(path):
            return self._core(method, m.group(1), m.group(2), m.group(3), body)
        if m := _JOBS.match(path):
            return self._jobs(method, m.group(1), m.group(2), body)
        if (m := _PODS.match(path)) and method == "GET":
            wanted = dict(kv.split("=", 1) for kv in (query.get("labelSelector", [""])[0].split(",")) if kv)
            items = [p for (ns, _), p in self.pods.items() if ns == m.group(1)
                     and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        if (m := _POD_LOG.match(path)) and method == "GET":
            key = (m.group(1), m.group(2))
            if key not in self.pods:
                return 404, _status(404, "NotFound", f'pods "{m.group(2)}" not found')
            if m.group(2) in self.pod_logs:
                return 200, self.pod_logs[m.group(2)]
            run = self._runs.get(key)
            if run is None:
                return 200, ""
            previous = _flag(query, "previous")
            log = run.folder / f"log.{run.restarts - 1}" if previous else run.log
            return 200, log.read_text(errors="replace") if log.exists() else ""
        if (m := _EVENTS.match(path)) and method == "GET":
            items = [e for e in self.events if e["metadata"]["namespace"] == m.group(1)]
            return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items}
        return 404, _status(404, "NotFound", f"the stand-in does not serve {method} {path}")

    def _core(self, method: str, ns: str, kind: str, name: str | None, body: Any) -> tuple[int, Any]:
        store = self.configmaps if kind == "configmaps" else self.secrets
        singular = kind[:-1]
        if method == "POST" and name is None:
            key = (ns, body["metadata"]["name"])
            if key in store:
                return 409, _status(409, "AlreadyExists", f'{kind} "{key[1]}" already exists')
            problems = self._validate(body)
            if problems:
                return 422, _status(422, "Invalid", f'{singular} "{key[1]}" is invalid: {"; ".join(problems)}')
            store[key] = body
            return 201, body
        if method == "GET" and name is not None:
            if (ns, name) not in store:
                return 404, _status(404, "NotFound", f'{kind} "{name}" not found')
            return 200, store[(ns, name)]
        return 405, _status(405, "MethodNotAllowed", f"{method} {kind}")

    def _jobs(self, method: str, ns: str, name: str | None, body: Any) -> tuple[int, Any]:
        if method == "POST" and name is None:
            key = (ns, body["metadata"]["name"])
            if key in self.jobs:
                return 409, _status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{key[1]}" already exists')
            problems = self._validate(body)
            if problems:
                return 422, _status(422, "Invalid", f'PyTorchJob.kubeflow.org "{key[1]}" is invalid: '
                                    + "; ".join(problems))
            stored = json.loads(json.dumps(body))
            stored["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), namespace=ns)
            self.jobs[key] = stored
            self.set_condition(ns, key[1], "Created")
            if not self.run_pods:  # recording only: the pods exist, the test moves the job's state
                for rtype, rspec in stored["spec"]["pytorchReplicaSpecs"].items():
                    for i in range(int(rspec.get("replicas", 1))):
                        self._create_pod(ns, key[1], rtype, i, rspec["template"])
                return 201, stored
            queue = stored["metadata"].get("labels", {}).get(QUEUE_LABEL)
            if queue:  # Kueue's webhook suspends a queued job; Kueue unsuspends it on admission
                stored["spec"].setdefault("runPolicy", {})["suspend"] = True
                self.set_condition(ns, key[1], "Suspended", reason="PyTorchJobSuspended",
                                   message=f"PyTorchJob {key[1]} is suspended (queue {queue}).")
            if not queue or queue not in self.held:
                threading.Thread(target=self._admit, args=(ns, key[1]), daemon=True).start()
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
            for key in [k for k, p in self.pods.items() if k[0] == ns and p["metadata"]["labels"][JOB_LABEL] == name]:
                self._delete_pod(key)
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 405, _status(405, "MethodNotAllowed", method)

    def _validate(self, obj: dict[str, Any]) -> list[str]:
        """The checks `motus k8s validate` runs: the CRD schema (+ admission rules) or the core schema."""
        from motus.launch import k8s_validate as kv

        if obj.get("kind") == "PyTorchJob" and self._crd is None:
            self._crd = kv.load_crd_schemas([kv.pytorchjob_crd_path()])
        return kv.validate_object(json.loads(json.dumps(obj)), crd_schemas=self._crd).problems

    # ------------------------------------------------------------------------------------- the operator
    @staticmethod
    def _suspended(job: dict[str, Any]) -> bool:
        return bool((job["spec"].get("runPolicy") or {}).get("suspend"))

    def _admit(self, ns: str, name: str) -> None:
        with self._lock:
            job = self.jobs.get((ns, name))
            if job is None:
                return
            job["spec"].setdefault("runPolicy", {})["suspend"] = False
            job.setdefault("status", {})["startTime"] = _now()
            self._ports[(ns, name)] = _free_port()
            replicas = job["spec"]["pytorchReplicaSpecs"]
            for rtype in ("Master", "Worker"):
                for i in range(int(replicas.get(rtype, {}).get("replicas", 0))):
                    self._create_pod(ns, name, rtype, i, replicas[rtype]["template"])
            self.set_condition(ns, name, "Running")

    def _create_pod(self, ns: str, job: str, rtype: str, index: int, template: dict) -> None:
        pod = f"{job}-{rtype.lower()}-{index}"
        labels = {**(template.get("metadata") or {}).get("labels", {}), JOB_LABEL: job,
                  "training.kubeflow.org/operator-name": "pytorchjob-controller",
                  "training.kubeflow.org/replica-type": rtype.lower(), "training.kubeflow.org/replica-index": str(index)}
        if rtype == "Master":
            labels["training.kubeflow.org/job-role"] = "master"
        self.pods[(ns, pod)] = {"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": pod, "namespace": ns, "labels": labels, "uid": str(uuid.uuid4())},
                                "spec": {"containers": [{"name": "pytorch", "image": "?"}]},
                                "status": {"phase": "Running" if not self.run_pods else "Pending"}}
        if not self.run_pods:
            return
        run = PodRun(ns, pod, job, rtype, index, self._root / ns / pod)
        run.folder.mkdir(parents=True, exist_ok=True)
        self._runs[(ns, pod)] = run
        threading.Thread(target=self._run_pod, args=(run, template, self._injected(run)), daemon=True).start()

    def _pod_status(self, run: PodRun, phase: str, *, waiting: tuple[str, str] | None = None,
                    exit_code: int | None = None, reason: str | None = None) -> None:
        with self._lock:
            pod = self.pods.get((run.ns, run.name))
            if pod is None:
                return
            if waiting:
                state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
            elif exit_code is not None:
                state = {"terminated": {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0
                                                                                    else "Error")}}
            else:
                state = {"running": {"startedAt": _now()}}
            pod["status"] = {"phase": phase, "reason": reason if run.evicted else None, "startTime": _now(),
                             "containerStatuses": [{"name": "pytorch", "image": pod["spec"]["containers"][0]["image"],
                                                    "imageID": "", "ready": phase == "Running",
                                                    "restartCount": run.restarts, "state": state}]}

    def _event(self, ns: str, kind: str, name: str, type_: str, reason: str, message: str) -> None:
        self.events.append({"apiVersion": "v1", "kind": "Event", "type": type_, "reason": reason, "message": message,
                            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:10]}", "namespace": ns},
                            "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                            "lastTimestamp": _now(), "count": 1})

    def _mounts(self, run: PodRun, spec: dict, container: dict) -> dict[str, Path] | str:
        """mountPath -> local folder, or why the pod cannot start."""
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for m in container.get("volumeMounts") or []:
            vol = volumes.get(m["name"])
            if vol is None:
                return f'volume "{m["name"]}" is not defined'
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if claim not in self.volumes:
                    return f'persistentvolumeclaim "{claim}" not found'
                mounts[m["mountPath"]] = Path(self.volumes[claim])
            elif "configMap" in vol:
                cm = self.configmaps.get((run.ns, vol["configMap"]["name"]))
                if cm is None:
                    return f'configmap "{vol["configMap"]["name"]}" not found'
                where = run.folder / f"cm-{m['name']}"
                where.mkdir(exist_ok=True)
                for key, text in (cm.get("data") or {}).items():
                    (where / key).write_text(text)
                mounts[m["mountPath"]] = where
            else:  # emptyDir and the rest: a fresh folder of the pod's
                where = run.folder / f"vol-{m['name']}"
                where.mkdir(exist_ok=True)
                mounts[m["mountPath"]] = where
        return mounts

    def _env(self, run: PodRun, container: dict, injected: dict) -> dict[str, str] | str:
        env = dict(injected)
        for e in container.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                env[e["name"]] = str(e.get("value", ""))
                continue
            secret = self.secrets.get((run.ns, ref["name"]))
            data = (secret or {}).get("stringData") or {}
            if ref["key"] in data:
                env[e["name"]] = data[ref["key"]]
            elif not ref.get("optional"):
                return f'secret "{ref["name"]}" not found' if secret is None else \
                    f'couldn\'t find key {ref["key"]} in Secret {run.ns}/{ref["name"]}'
        return env

    def _start(self, run: PodRun, container: dict, spec: dict, injected: dict, log) -> subprocess.Popen | str:
        image = self.images.get(container.get("image", ""))
        if image is None:
            return f"ErrImagePull: image {container.get('image')!r} is not on this cluster"
        mounts = self._mounts(run, spec, container)
        if isinstance(mounts, str):
            return f"CreateContainerConfigError: {mounts}"
        env = self._env(run, container, injected)
        if isinstance(env, str):
            return f"CreateContainerConfigError: {env}"

        # a mount path wherever it starts a path: a whole argument, an env value, or inside the worker's --spec JSON
        where = re.compile("(?<![\\w./-])(" + "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
                           + ")(?=/|\"|$)") if mounts else None

        def local(value: str) -> str:
            return where.sub(lambda m: str(mounts[m.group(1)]), value) if where else value

        argv = [local(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = image.python
        full_env = {**image.env, **{k: local(v) for k, v in env.items()}}
        cwd = local(container.get("workingDir") or "/")
        return subprocess.Popen(argv, cwd=cwd if Path(cwd).is_dir() else run.folder, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def _run_pod(self, run: PodRun, template: dict, injected: dict) -> None:
        spec = template["spec"]
        with self._lock:
            self.pods[(run.ns, run.name)]["spec"]["containers"][0]["image"] = spec["containers"][0].get("image", "")
        code = None
        with open(run.log, "ab") as log:
            for init in spec.get("initContainers") or []:
                proc = self._start(run, init, spec, injected, log)
                if isinstance(proc, str):
                    return self._cannot_start(run, proc)
                if init.get("restartPolicy") == "Always":
                    run.sidecars.append(proc)
                    continue
                run.proc = proc
                if proc.wait() != 0:
                    code = proc.returncode
                    break
            if code is None:
                proc = self._start(run, spec["containers"][0], spec, injected, log)
                if isinstance(proc, str):
                    return self._cannot_start(run, proc)
                run.proc = proc
                self._pod_status(run, "Running")
                code = proc.wait()
            for side in run.sidecars:
                _signal(side, signal.SIGTERM)
            for side in run.sidecars:
                try:
                    side.wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    _signal(side, signal.SIGKILL)
            run.sidecars.clear()
        self._ended(run, 128 - code if code < 0 else code)

    def _cannot_start(self, run: PodRun, why: str) -> None:
        reason, _, message = why.partition(": ")
        self._pod_status(run, "Pending", waiting=(reason, message))
        with self._lock:
            self._event(run.ns, "Pod", run.name, "Warning", reason, message)

    def _ended(self, run: PodRun, code: int) -> None:
        """The operator's reaction to a container exit (restartPolicy ExitCode, backoffLimit)."""
        with self._lock:
            if run.deleted or (run.ns, run.job) not in self.jobs:
                return
            job = self.jobs[(run.ns, run.job)]
            rspec = job["spec"]["pytorchReplicaSpecs"][run.rtype]
            policy = rspec.get("restartPolicy", "Never")
            reason = "Evicted" if run.evicted else ("OOMKilled" if code == 137 else None)
            self._pod_status(run, "Succeeded" if code == 0 else "Failed", exit_code=code, reason=reason)
            if self.state(run.ns, run.job) in ("Succeeded", "Failed"):
                return
            if code == 0:
                if run.rtype == "Master":
                    self._finish(run.ns, run.job, "Succeeded", "PyTorchJobSucceeded",
                                 f"PyTorchJob {run.job} is successfully completed.")
                return
            retryable = policy in ("Always", "OnFailure") or (policy == "ExitCode" and code >= 128)
            limit = int((job["spec"].get("runPolicy") or {}).get("backoffLimit", 6))
            restarts = sum(r.restarts for r in self._runs.values() if r.job == run.job and r.ns == run.ns)
            if retryable and restarts < limit:
                self.set_condition(run.ns, run.job, "Restarting", reason="PyTorchJobRestarting",
                                   message=f"PyTorchJob {run.job} is restarting because {run.name} exited with "
                                           f"code {code}{' (evicted)' if run.evicted else ''}.")
                self._event(run.ns, "PyTorchJob", run.job, "Warning", "PyTorchJobRestarting",
                            f"{run.name} exited with code {code}; restarting the pod")
                run.restarts += 1
                run.evicted = False
                template = rspec["template"]
                injected = self._injected(run)
                threading.Thread(target=self._restart, args=(run, template, injected), daemon=True).start()
                return
            if retryable:  # the operator's own wording (training-operator v1.9, common job controller)
                message = f"Job {run.job} has failed because it has reached the specified backoff limit"
            else:
                message = (f"PyTorchJob {run.job} is failed because 1 {run.rtype} replica(s) failed: {run.name} "
                           f"exited with code {code}{' (evicted)' if reason == 'Evicted' else ''}.")
            self._finish(run.ns, run.job, "Failed", "PyTorchJobFailed", message)

    def _restart(self, run: PodRun, template: dict, injected: dict) -> None:
        self._pod_status(run, "Pending")
        with self._lock:
            self.set_condition(run.ns, run.job, "Running")
        self._run_pod(run, template, injected)

    def _injected(self, run: PodRun) -> dict:
        """The env the operator sets in every pod of a PyTorchJob (torchrun reads the PET_* ones)."""
        job = self.jobs[(run.ns, run.job)]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        nnodes = sum(int(r.get("replicas", 1)) for r in replicas.values())
        nproc = int(job["spec"].get("nprocPerNode") or 1)
        rank = 0 if run.rtype == "Master" else 1 + run.index
        port = self._ports[(run.ns, run.job)]
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nnodes * nproc),
                "RANK": str(rank), "PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": str(nproc),
                "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
                "PYTHONUNBUFFERED": "1"}

    def _finish(self, ns: str, name: str, state: str, reason: str, message: str) -> None:
        self.set_condition(ns, name, state, completion=_now(), reason=reason, message=message)
        self._event(ns, "PyTorchJob", name, "Normal" if state == "Succeeded" else "Warning", reason, message)
        # cleanPodPolicy Running: the pods still running are deleted
        for run in list(self._runs.values()):
            if run.job == name and run.ns == ns and run.proc is not None and run.proc.poll() is None:
                threading.Thread(target=self._kill, args=(run, self.grace_s), daemon=True).start()

    def _delete_pod(self, key: tuple[str, str]) -> None:
        self.pods.pop(key, None)
        run = self._runs.pop(key, None)
        if run is not None:
            run.deleted = True
            threading.Thread(target=self._kill, args=(run, self.grace_s), daemon=True).start()

    def _kill(self, run: PodRun, grace: float) -> None:
        procs = [p for p in (run.proc, *run.sidecars) if p is not None and p.poll() is None]
        for p in procs:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.wait()

    def _follow(self, handler: BaseHTTPRequestHandler, ns: str, pod: str) -> None:
        """`follow=true`: the log as it grows, until the container ends (what `kubectl logs -f` reads)."""
        with self._lock:
            run = self._runs.get((ns, pod))
        handler.send_response(200 if run else 404)
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        if run is None:
            return
        pos = 0
        while True:
            done = run.proc is not None and run.proc.poll() is not None
            if run.log.exists():
                with open(run.log, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                pos += len(chunk)
                if chunk:
                    handler.wfile.write(chunk)
                    handler.wfile.flush()
            if done or run.deleted:
                return
            time.sleep(0.2)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter as the API server parses it (Go's ParseBool: the Python client sends `True`)."""
    return (query.get(name) or [""])[-1] in ("1", "t", "T", "true", "TRUE", "True")


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass
