"""The `kubernetes` launcher: the same job spec as `local`, run as a Kubeflow PyTorchJob.

`build_pytorchjob` turns a `JobSpec` into a `KubeflowOrgV1PyTorchJob` (the kubeflow-training SDK's model):
1 Master + (nodes - 1) Workers, `nprocPerNode` = GPUs per node, each pod running the *same* worker command as
the local launcher under torchrun. torchrun reads its node count, node rank, rendezvous address and processes
per node from the `PET_*` variables the Training Operator sets in every pod, so the command carries none of
them and works unchanged for static and elastic jobs.

Where things live on the cluster (all pods see the same paths):

* `/workspace`: a ReadWriteMany PersistentVolumeClaim and the working directory. The spec's relative run folder
  and `params.yaml`'s `data.root` resolve under it, so checkpoints (committed by an atomic folder rename, which
  needs a POSIX filesystem every rank sees) and data tiers are shared by every rank of every node;
* `/etc/motus/params.yaml`: the submitter's params file, as an immutable ConfigMap named after its config hash,
  so a job always runs exactly the configuration it was submitted with;
* the object store: when a checkpoint remote (`s3://...`) is set, the Master pod restores the mirror's latest
  complete checkpoint before training (init container) and mirrors new ones while it trains (native sidecar),
  see `checkpoint_store`. A restarted or resubmitted job therefore resumes from the latest complete
  checkpoint even on a fresh volume;
* credentials: only `secretKeyRef`s (S3 keys, optional MLflow user/password); a spec env entry that looks like a
  credential is refused rather than written inline, and the tracking URI goes into the job without its user
  and password (`http://svc:pw@mlflow` -> `http://mlflow`): anyone who may list PyTorchJobs reads their env,
  so the pods authenticate with the MLflow Secret's `MLFLOW_TRACKING_USERNAME`/`_PASSWORD` instead.

`KubernetesLauncher` submits, watches, streams logs and cancels through `TrainingClient`; `job_gpu_hours`
is nodes x GPUs per node x wall hours of a finished (or running) job.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ..config import Params, Pool, Settings, config_hash, stage_key
from ..contracts import JobSpec
from ..track.accounting import device_hours
from .launcher import CANCELLED, FAILED, KILLED, SUCCEEDED, JobHandle, JobOutcome

WORKSPACE = "/workspace"
PARAMS_DIR = "/etc/motus"
PARAMS_PATH = f"{PARAMS_DIR}/params.yaml"
CONTAINER = "pytorch"  # the Training Operator finds the training container by this name
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CLUSTER_TRACKING_URI = "http://mlflow.motus-system.svc.cluster.local:5000"  # infra/mlflow
STUCK_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                           "CreateContainerError"})
_URI_PASSWORD = re.compile(r"://[^/@\s:]*:[^/@\s]+@")
_SECRET_LIKE = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL)", re.I)


class ClusterError(RuntimeError):
    """The cluster could not be used (no kubeconfig, API unreachable, request refused); the message says why.
    `transient`: the API was unreachable or answered 429/5xx, which a later try may not meet (infrastructure);
    a refusal (4xx, a missing Secret, a quota) is the request's own and comes back on every try."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def _transient(status: Any) -> bool:
    return status is None or status == 429 or (isinstance(status, int) and status >= 500)


@dataclass
class ClusterOptions:
    """Cluster-only choices; the local launcher never sees these. Defaults match `k8s/` and `infra/`."""

    namespace: str = "motus"
    name: str | None = None  # None: motus-<stage>-<config hash[:8]>, so resubmitting the same job reuses it
    service_account: str = "motus-trainer"
    workspace_pvc: str = "motus-workspace"
    s3_secret: str = "motus-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    mlflow_secret: str | None = "motus-mlflow"  # optional keys MLFLOW_TRACKING_USERNAME / _PASSWORD
    tracking_uri: str | None = None  # None: the settings' URI, or the in-cluster MLflow when that is SQLite
    s3_endpoint_url: str | None = None  # None: the settings' endpoint (None there = AWS)
    data_remote: str | None = None
    checkpoint_remote: str | None = None  # s3://bucket/prefix; None: derived from an s3 data remote
    shm_size: str = "64Gi"
    cpu: str | None = None
    memory: str | None = None
    backoff_limit: int = 3
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    active_deadline_seconds: int | None = None
    clean_pod_policy: str = "Running"
    priority_class: str | None = None
    elastic_min_nodes: int | None = None  # set both for an elastic job (c10d rendezvous)
    elastic_max_nodes: int | None = None
    max_restarts: int = 3
    mirror_interval_s: int = 120
    # a pod waiting this long in a state that does not fix itself (an image that cannot be pulled, a missing
    # Secret key) fails the job: the operator would let it wait forever
    stuck_grace_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ClusterOptions:
        base = cls(s3_endpoint_url=settings.s3_endpoint_url, data_remote=settings.data_remote,
                   tracking_uri=None if settings.tracking_uri.startswith(("sqlite:", "file:", "./", "/"))
                   or "://" not in settings.tracking_uri else settings.tracking_uri)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def job_tracking_uri(self, uri: str | None = None) -> str:
        """The tracking URI (`uri`, else the options') as a job's spec may carry it: without user information.
        A URI that carried a password with no MLflow Secret to take its place is refused (the job could not
        authenticate)."""
        from urllib.parse import urlsplit, urlunsplit

        uri = uri or self.tracking_uri or CLUSTER_TRACKING_URI
        parts = urlsplit(uri)
        if "@" not in parts.netloc:
            return uri
        if parts.password and not self.mlflow_secret:
            raise ValueError("the tracking URI carries a password, and no MLflow Secret is configured to give the "
                             "job's pods their credentials: put MLFLOW_TRACKING_USERNAME/_PASSWORD in a Secret and "
                             "set cluster.mlflow_secret (a job's env is readable by whoever may list jobs)")
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


# ------------------------------------------------------------------------------------------------ render


def job_name(spec: JobSpec, params: Params) -> str:
    return f"motus-{spec.stage}-{config_hash(params)[:8]}".lower().replace("_", "-")


def params_configmap_name(params: Params) -> str:
    return f"motus-params-{config_hash(params)[:10]}"


def pool_of(params: Params, name: str | None) -> tuple[str, Pool]:
    if not params.pools:
        raise ValueError("params.yaml: pools: no GPU pools defined; add pools.a100 / pools.h100")
    if name is None:
        raise ValueError(f"a cluster job needs a pool (params.yaml pools: {', '.join(sorted(params.pools))})")
    if name not in params.pools:
        raise ValueError(f"params.yaml: pools.{name}: unknown pool (known: {', '.join(sorted(params.pools))})")
    return name, params.pools[name]


def checkpoint_remote(spec: JobSpec, opts: ClusterOptions) -> str | None:
    """Where this run's checkpoints are mirrored: `<remote>/<run dir>`; None keeps them on the volume only."""
    base = opts.checkpoint_remote
    if base is None and opts.data_remote and opts.data_remote.startswith("s3://"):
        bucket = opts.data_remote[5:].split("/", 1)[0]
        base = f"s3://{bucket}/runs"
    if base is None:
        return None
    return f"{base.rstrip('/')}/{PurePosixPath(str(spec.run_dir)).as_posix().strip('/')}"


def _env(spec: JobSpec, opts: ClusterOptions) -> list[Any]:
    from kubernetes.client import V1EnvVar, V1EnvVarSource, V1SecretKeySelector

    def secret(var: str, name: str, key: str, optional: bool = False) -> Any:
        return V1EnvVar(name=var, value_from=V1EnvVarSource(
            secret_key_ref=V1SecretKeySelector(name=name, key=key, optional=optional or None)))

    plain = {"PYTHONUNBUFFERED": "1", "MOTUS_PARAMS": PARAMS_PATH, "MOTUS_LAUNCHER": "kubernetes",
             "MOTUS_PROFILE": "production", "MOTUS_TRACKING_URI": opts.job_tracking_uri(),
             "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    if opts.data_remote:
        plain["MOTUS_DATA_REMOTE"] = opts.data_remote
    if opts.s3_endpoint_url:
        plain.update(MOTUS_S3_ENDPOINT_URL=opts.s3_endpoint_url, MLFLOW_S3_ENDPOINT_URL=opts.s3_endpoint_url,
                     AWS_ENDPOINT_URL_S3=opts.s3_endpoint_url)
    for key, value in spec.env.items():
        if _SECRET_LIKE.search(key):
            raise ValueError(f"job env {key}: credentials must come from a Kubernetes Secret, not inline "
                             f"(put it in Secret '{opts.s3_secret}' or your own and reference it)")
        if key == "MOTUS_TRACKING_URI":
            value = opts.job_tracking_uri(value)
        elif _URI_PASSWORD.search(str(value)):
            raise ValueError(f"job env {key}: a URI with a password must not be written inline; give the job its "
                             "credentials from a Kubernetes Secret")
        plain[key] = value
    env = [V1EnvVar(name=k, value=v) for k, v in plain.items()]
    env += [secret("AWS_ACCESS_KEY_ID", opts.s3_secret, "AWS_ACCESS_KEY_ID"),
            secret("AWS_SECRET_ACCESS_KEY", opts.s3_secret, "AWS_SECRET_ACCESS_KEY")]
    if opts.mlflow_secret:
        env += [secret("MLFLOW_TRACKING_USERNAME", opts.mlflow_secret, "MLFLOW_TRACKING_USERNAME", True),
                secret("MLFLOW_TRACKING_PASSWORD", opts.mlflow_secret, "MLFLOW_TRACKING_PASSWORD", True)]
    return env


def worker_command(spec: JobSpec) -> list[str]:
    """The local launcher's worker command, without the torchrun flags the operator supplies as PET_* env."""
    cluster_spec = dataclasses.replace(spec, params_file=Path(PARAMS_PATH))
    # motus.launch.node is torchrun with exit codes restartPolicy ExitCode can act on (an eviction restarts)
    return ["python", "-m", "motus.launch.node", "-m", "motus.launch.worker", *cluster_spec.worker_args()]


def build_pytorchjob(spec: JobSpec, params: Params, opts: ClusterOptions | None = None) -> Any:
    """The PyTorchJob (kubeflow-training SDK model) that runs `spec` on its pool; raises ValueError naming
    the bad key or option."""
    from kubeflow.training import models as m
    from kubernetes.client import (
        V1ConfigMapVolumeSource,
        V1Container,
        V1EmptyDirVolumeSource,
        V1ObjectMeta,
        V1PersistentVolumeClaimVolumeSource,
        V1PodSpec,
        V1PodTemplateSpec,
        V1ResourceRequirements,
        V1Toleration,
        V1Volume,
        V1VolumeMount,
    )

    opts = opts or ClusterOptions()
    if spec.stage not in params.stages and spec.stage != "latent-action":
        raise ValueError(f"params.yaml: stages.{spec.stage}: unknown stage "
                         f"(known: {', '.join(sorted(params.stages))})")
    if not spec.image:
        raise ValueError("no container image: pass --image or set MOTUS_IMAGE")
    if spec.nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {spec.nodes}")
    pool_name, pool = pool_of(params, spec.pool)
    gpus = pool.gpus_per_node
    nproc = spec.procs_per_node
    if gpus and nproc > gpus:
        raise ValueError(f"procs per node {nproc} exceeds pools.{pool_name}.gpus_per_node {gpus}")
    elastic = None
    if opts.elastic_min_nodes is not None or opts.elastic_max_nodes is not None:
        lo = opts.elastic_min_nodes or spec.nodes
        hi = opts.elastic_max_nodes or spec.nodes
        if not 1 <= lo <= spec.nodes <= hi:
            raise ValueError(f"elastic nodes need 1 <= min ({lo}) <= nodes ({spec.nodes}) <= max ({hi})")
        elastic = m.KubeflowOrgV1ElasticPolicy(min_replicas=lo, max_replicas=hi, rdzv_backend="c10d",
                                               max_restarts=opts.max_restarts)

    name = opts.name or job_name(spec, params)
    mounts = [V1VolumeMount(name="workspace", mount_path=WORKSPACE),
              V1VolumeMount(name="params", mount_path=PARAMS_DIR, read_only=True),
              V1VolumeMount(name="dshm", mount_path="/dev/shm")]
    volumes = [V1Volume(name="workspace", persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(
                   claim_name=opts.workspace_pvc)),
               V1Volume(name="params", config_map=V1ConfigMapVolumeSource(name=params_configmap_name(params))),
               # NCCL and the data loader's workers share memory through /dev/shm; the runtime's 64 MB is too small
               V1Volume(name="dshm", empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=opts.shm_size))]
    amounts: dict[str, str] = {}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    if opts.cpu:
        amounts["cpu"] = opts.cpu
    if opts.memory:
        amounts["memory"] = opts.memory
    resources = V1ResourceRequirements(requests=dict(amounts) or None, limits=dict(amounts) or None)
    env = _env(spec, opts)
    remote = checkpoint_remote(spec, opts)

    def pod(role: str) -> Any:
        main = V1Container(name=CONTAINER, image=spec.image, image_pull_policy="IfNotPresent",
                           command=worker_command(spec), env=env, resources=resources,
                           volume_mounts=mounts, working_dir=WORKSPACE)
        init = None
        if role == "Master" and remote:
            store = ["python", "-m", "motus.launch.checkpoint_store"]
            where = ["--run-dir", str(spec.run_dir), "--remote", remote]
            small = V1ResourceRequirements(requests={"cpu": "250m", "memory": "512Mi"})
            init = [V1Container(name="restore", image=spec.image, command=[*store, "restore", *where], env=env,
                                volume_mounts=mounts[:1], working_dir=WORKSPACE, resources=small),
                    # restartPolicy Always = a native sidecar: runs beside training, stopped (SIGTERM) after it
                    V1Container(name="mirror", image=spec.image, restart_policy="Always",
                                command=[*store, "mirror", *where, "--interval", str(opts.mirror_interval_s)],
                                env=env, volume_mounts=mounts[:1], working_dir=WORKSPACE, resources=small)]
        tolerations = [V1Toleration(**{_snake(k): v for k, v in t.items()}) for t in pool.tolerations] or None
        return V1PodTemplateSpec(
            metadata=V1ObjectMeta(labels={"app.kubernetes.io/name": "motus", "motus/stage": spec.stage,
                                          "motus/pool": pool_name}),
            spec=V1PodSpec(containers=[main], init_containers=init, volumes=volumes,
                           node_selector=dict(pool.node_selector) or None, tolerations=tolerations,
                           service_account_name=opts.service_account,
                           priority_class_name=opts.priority_class))

    # ExitCode: signals and OOM kills (exit > 127) restart the pod and resume; a config error (exit 1) fails fast
    replicas = {"Master": m.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=pod("Master"))}
    if spec.nodes > 1:
        replicas["Worker"] = m.KubeflowOrgV1ReplicaSpec(replicas=spec.nodes - 1, restart_policy="ExitCode",
                                                        template=pod("Worker"))
    labels = {"app.kubernetes.io/name": "motus", "app.kubernetes.io/component": "training",
              "motus/stage": spec.stage, "motus/pool": pool_name}
    if pool.queue:
        labels[QUEUE_LABEL] = pool.queue
    run_policy = m.KubeflowOrgV1RunPolicy(
        backoff_limit=opts.backoff_limit, ttl_seconds_after_finished=opts.ttl_seconds_after_finished,
        clean_pod_policy=opts.clean_pod_policy, active_deadline_seconds=opts.active_deadline_seconds,
        # gang scheduling: all nodes or none (honoured by gang schedulers; Kueue admits the job as a whole)
        scheduling_policy=m.KubeflowOrgV1SchedulingPolicy(min_available=elastic.min_replicas if elastic
                                                          else spec.nodes, priority_class=opts.priority_class))
    return m.KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1", kind="PyTorchJob",
        metadata=V1ObjectMeta(name=name, namespace=opts.namespace, labels=labels, annotations={
            "motus/config-hash": config_hash(params), "motus/nodes": str(spec.nodes),
            "motus/gpus-per-node": str(gpus), "motus/gpu": pool.gpu, "motus/run-dir": str(spec.run_dir),
            **({"motus/checkpoint-remote": remote} if remote else {})}),
        spec=m.KubeflowOrgV1PyTorchJobSpec(pytorch_replica_specs=replicas, nproc_per_node=str(nproc),
                                          run_policy=run_policy, elastic_policy=elastic))


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def params_configmap(params_file: Path, params: Params, namespace: str) -> dict[str, Any]:
    """The ConfigMap the job mounts: the params file's bytes, immutable, named after its config hash."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
            "metadata": {"name": params_configmap_name(params), "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "motus"},
                         "annotations": {"motus/config-hash": config_hash(params)}},
            "data": {"params.yaml": Path(params_file).read_text()}}


def to_manifest(obj: Any) -> dict[str, Any]:
    """A model object (SDK or kubernetes client) as the plain dict the API server receives."""
    if isinstance(obj, dict):
        return copy.deepcopy(obj)
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the params file in its ConfigMap) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)


# --------------------------------------------------------------------------------------------- accounting


def _parse_time(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _nodes(job: dict[str, Any]) -> int:
    return sum(int(r.get("replicas", 1)) for r in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values())


def _devices(job: dict[str, Any]) -> int:
    return _nodes(job) * max(1, int((job.get("spec") or {}).get("nprocPerNode") or 1))


def _held_seconds(job: dict[str, Any], now: dt.datetime | None = None) -> float | None:
    """Start to completion (or to `now` while running) from the job's status; None before it started."""
    status = job.get("status") or {}
    start = _parse_time(status.get("startTime"))
    if start is None:
        return None
    end = _parse_time(status.get("completionTime")) or now or dt.datetime.now(dt.timezone.utc)
    return max(0.0, (end - start).total_seconds())


def _seconds_between(a: Any, b: Any) -> float | None:
    start, end = _parse_time(a), _parse_time(b)
    return None if start is None or end is None else max(0.0, (end - start).total_seconds())


def job_gpu_hours(job: dict[str, Any], now: dt.datetime | None = None) -> float | None:
    """Nodes x GPUs per node x wall hours (start to completion, or to `now` while running); None before start."""
    held = _held_seconds(job, now)
    gpus = int(((job.get("metadata") or {}).get("annotations") or {}).get("motus/gpus-per-node", 0))
    return None if held is None else device_hours(_nodes(job), gpus, held)


def job_device_hours(job: dict[str, Any], now: dt.datetime | None = None) -> float | None:
    """Nodes x processes per node (a GPU pool: its GPUs; a CPU pool: one) x wall hours from the job's own start
    and completion times; None before it started."""
    held = _held_seconds(job, now)
    return None if held is None else device_hours(1, _devices(job), held)


def job_state(job: dict[str, Any]) -> str:
    """The latest true condition (Created, Running, Restarting, Succeeded, Failed, Suspended) or Pending."""
    conds = [c for c in ((job.get("status") or {}).get("conditions") or []) if c.get("status") == "True"]
    return conds[-1]["type"] if conds else "Pending"


_PHASES = {"Created": "queued", "Suspended": "queued", "Pending": "queued", "Running": "running",
           "Restarting": "restarting", "Succeeded": "succeeded", "Failed": "failed"}


def job_progress(job: dict[str, Any], workspace: Path | None = None) -> dict[str, Any]:
    """Where a job stands, as `motus k8s status` prints it: phase, nodes, GPU- and device-hours so far, restarts,
    seconds queued before it started, and goodput from its run folder's metrics when `workspace` (the volume as
    seen here) holds them; goodput None otherwise."""
    from ..track.accounting import run_goodput

    status = job.get("status") or {}
    meta = job.get("metadata") or {}
    out: dict[str, Any] = {
        "phase": _PHASES.get(job_state(job), job_state(job).lower()), "nodes": _nodes(job),
        "gpu_hours": job_gpu_hours(job), "device_hours": job_device_hours(job),
        "restarts": sum(1 for c in status.get("conditions") or [] if c.get("type") == "Restarting"),
        "queued_s": _seconds_between(meta.get("creationTimestamp"), status.get("startTime")),
        "goodput": None, "lost_device_hours": None, "redone_steps": None}
    run_dir = (meta.get("annotations") or {}).get("motus/run-dir")
    if workspace is not None and run_dir and out["device_hours"] is not None:
        good = run_goodput(Path(workspace) / run_dir, out["device_hours"], _devices(job)) or {}
        out.update({k: v for k, v in good.items() if k in ("goodput", "lost_device_hours", "redone_steps")})
    return out


# ---------------------------------------------------------------------------------------------- the client


def find_kubeconfig(path: str | Path | None = None) -> Path | None:
    """Explicit path, else the first of $KUBECONFIG's files that exists, else ~/.kube/config; None if none."""
    if path:
        return Path(path) if Path(path).is_file() else None
    for p in filter(None, os.environ.get("KUBECONFIG", "").split(os.pathsep)):
        if Path(p).expanduser().is_file():
            return Path(p).expanduser()
    default = Path("~/.kube/config").expanduser()
    return default if default.is_file() else None


class ClusterClient:
    """Submit, watch, stream logs of and cancel PyTorchJobs through the kubeflow-training `TrainingClient`."""

    def __init__(self, kubeconfig: str | Path | None = None, context: str | None = None,
                 namespace: str = "motus", request_timeout: float = 10.0):
        from kubeflow.training import TrainingClient
        from kubernetes.config import ConfigException

        self.namespace, self.timeout = namespace, request_timeout
        found = find_kubeconfig(kubeconfig)
        in_cluster = found is None and kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if found is None and not in_cluster:
            where = str(kubeconfig) if kubeconfig else (os.environ.get("KUBECONFIG") or "~/.kube/config")
            raise ClusterError(f"no kubeconfig: {where} does not exist and this is not a pod in a cluster; "
                               "pass --kubeconfig or set KUBECONFIG (use --dry-run to print the job instead)")
        try:
            self.client = TrainingClient(config_file=str(found) if found else None, context=context,
                                         namespace=namespace)
        except (ConfigException, ValueError, TypeError, KeyError) as e:
            raise ClusterError(f"kubeconfig {found}: unusable: {e}") from None
        self.api_client = self.client.custom_api.api_client
        self.host = self.api_client.configuration.host

    # One cheap request first, so an unreachable API gives one plain sentence instead of the SDK's retries.
    def ping(self) -> str:
        from kubernetes.client import VersionApi
        from kubernetes.client.exceptions import ApiException

        try:
            info = VersionApi(self.api_client).get_code(_request_timeout=self.timeout)
        except ApiException as e:
            raise ClusterError(f"Kubernetes API {self.host} refused the request: {e.status} {e.reason}",
                               transient=_transient(e.status)) from None
        except Exception as e:  # noqa: BLE001 - urllib3 connection errors: report the cause, not the stack
            reason = getattr(e, "reason", None) or e
            raise ClusterError(f"Kubernetes API {self.host} is unreachable: {reason}", transient=True) from None
        return info.git_version

    def submit(self, job: Any, configmap: dict[str, Any] | None = None, *, replace_finished: bool = False) -> str:
        """Create the params ConfigMap (kept when one with that name exists: its name is its hash) and the job.
        `replace_finished`: a job of that name that already ended (a retry after a failure or an eviction) is
        deleted first; one that is still queued or running is never touched."""
        from kubernetes.client.exceptions import ApiException

        self.ping()
        # refused before anything is created: a job Kueue could never admit, or whose pods would wait forever
        manifest = to_manifest(job)
        problem = quota_problem(manifest, Path("k8s/kueue"))
        if problem:
            raise ClusterError(problem)
        self.require_secrets(required_secrets(manifest))
        if configmap is not None:
            try:
                self.client.core_api.create_namespaced_config_map(self.namespace, configmap,
                                                                  _request_timeout=self.timeout)
            except ApiException as e:
                if e.status != 409:
                    raise ClusterError(f"creating ConfigMap {configmap['metadata']['name']}: "
                                       f"{e.status} {e.reason}") from None
        name = job.metadata.name
        if replace_finished:
            self._remove_if_finished(name)
        try:
            self.client.create_job(job=job, namespace=self.namespace)
        except RuntimeError as e:
            cause = e.__cause__
            if getattr(cause, "status", None) == 409:
                raise ClusterError(f"PyTorchJob {self.namespace}/{name} already exists; `motus k8s cancel {name}` "
                                   "first (the run folder keeps its checkpoints) or pass --name") from None
            raise ClusterError(f"creating PyTorchJob {self.namespace}/{name}: "
                               f"{getattr(cause, 'status', '')} {getattr(cause, 'reason', '') or e}") from None
        return name

    def _remove_if_finished(self, name: str, wait_s: float = 60.0) -> None:
        try:
            old = to_manifest(self.client.get_job(name, namespace=self.namespace))
        except RuntimeError:
            return  # no such job
        if job_state(old) not in ("Succeeded", "Failed"):
            return  # queued or running: the create below says it exists
        self.cancel(name)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                self.client.get_job(name, namespace=self.namespace)
            except RuntimeError:
                return
            time.sleep(0.5)

    def require_secrets(self, names: list[str]) -> None:
        """Refuse, before submitting, a job whose pods would wait forever for a Secret that does not exist."""
        from kubernetes.client.exceptions import ApiException

        for secret in names:
            try:
                self.client.core_api.read_namespaced_secret(secret, self.namespace, _request_timeout=self.timeout)
            except ApiException as e:
                if e.status == 404:
                    raise ClusterError(f"Secret {self.namespace}/{secret} does not exist; the job's pods read "
                                       f"credentials from it (`kubectl -n {self.namespace} create secret generic "
                                       f"{secret} ...`, README: Run on a cluster)") from None
                raise ClusterError(f"reading Secret {self.namespace}/{secret}: {e.status} {e.reason}") from None

    def get(self, name: str) -> dict[str, Any]:
        self.ping()
        try:
            return to_manifest(self.client.get_job(name, namespace=self.namespace))
        except RuntimeError as e:
            raise ClusterError(f"PyTorchJob {self.namespace}/{name}: {_why(e)}",
                               transient=_transient(getattr(e.__cause__, "status", 0))) from None

    def list(self) -> list[dict[str, Any]]:
        self.ping()
        try:
            return [to_manifest(j) for j in self.client.list_jobs(namespace=self.namespace)]
        except RuntimeError as e:
            raise ClusterError(f"listing PyTorchJobs in {self.namespace}: {_why(e)}",
                               transient=_transient(getattr(e.__cause__, "status", 0))) from None

    def logs(self, name: str, follow: bool = False, worker: int | None = None,
             all_pods: bool = False) -> dict[str, str]:
        """Logs of the Master pod (or Worker `worker`, or every pod); with `follow` the SDK streams them to stdout
        as they come."""
        self.ping()
        kw = dict(is_master=True) if worker is None else dict(is_master=False, replica_type="worker",
                                                               replica_index=worker)
        if all_pods:
            kw = dict(is_master=False)
        try:
            logs, _ = self.client.get_job_logs(name, namespace=self.namespace, follow=follow, **kw)
        except RuntimeError as e:
            raise ClusterError(f"logs of PyTorchJob {self.namespace}/{name}: {_why(e)}",
                               transient=_transient(getattr(e.__cause__, "status", 0))) from None
        return logs

    def stuck_pods(self, name: str) -> dict[str, str]:
        """The job's pods whose containers wait for a reason that does not go away by waiting: pod -> reason."""
        try:
            pods = self.client.get_job_pods(name, namespace=self.namespace, is_master=False)
        except RuntimeError:
            return {}
        stuck: dict[str, str] = {}
        for pod in pods:
            statuses = [*((pod.status and pod.status.init_container_statuses) or []),
                        *((pod.status and pod.status.container_statuses) or [])]
            for c in statuses:
                waiting = c.state.waiting if c.state is not None else None
                if waiting is not None and waiting.reason in STUCK_REASONS:
                    stuck[pod.metadata.name] = f"{waiting.reason}: {waiting.message or ''}".rstrip(": ")
        return stuck

    def cancel(self, name: str) -> None:
        self.ping()
        try:
            self.client.delete_job(name, namespace=self.namespace)
        except RuntimeError as e:
            raise ClusterError(f"cancelling PyTorchJob {self.namespace}/{name}: {_why(e)}",
                               transient=_transient(getattr(e.__cause__, "status", 0))) from None


# ---------------------------------------------------------------------------------------------- the launcher


def cluster_spec(spec: JobSpec, params: Params, settings: Settings | None = None) -> JobSpec:
    """The spec as a cluster runs it: a pool (the spec's, else MOTUS_POOL), the image (else MOTUS_IMAGE), and
    every GPU of each node (`procs_per_node` on a machine of its own has no meaning on a pool)."""
    pool = spec.pool or (settings.pool if settings is not None else None)
    if pool is None:
        raise ValueError(f"a cluster job needs a pool: set MOTUS_POOL or pass one "
                         f"(params.yaml pools: {', '.join(sorted(params.pools)) or 'none'})")
    _, cfg = pool_of(params, pool)
    image = spec.image or (settings.image if settings is not None else None)
    return spec.with_updates(pool=pool, image=image, procs_per_node=max(1, cfg.gpus_per_node))


class KubernetesLauncher:
    """The `Launcher` for clusters: a `JobSpec` becomes the PyTorchJob (and params ConfigMap) that
    `motus k8s render` prints for it, submitted through `ClusterClient`; `wait` polls its conditions."""

    kind = "kubernetes"

    def __init__(self, client: ClusterClient, settings: Settings, opts: ClusterOptions, poll_s: float = 10.0):
        self.client, self.settings, self.opts, self.poll_s = client, settings, opts, poll_s

    @classmethod
    def from_settings(cls, settings: Settings, *, kubeconfig: str | Path | None = None, context: str | None = None,
                      namespace: str = "motus") -> KubernetesLauncher:
        client = ClusterClient(kubeconfig, context=context, namespace=namespace)
        return cls(client, settings, ClusterOptions.from_settings(settings, namespace=namespace), settings.k8s_poll_s)

    def render(self, spec: JobSpec) -> tuple[Any, dict[str, Any]]:
        """(PyTorchJob model, params ConfigMap) for the spec: exactly what `motus k8s render` prints."""
        from ..config import load_params

        params = load_params(spec.params_file)
        full = cluster_spec(spec.with_updates(stage=stage_key(params, spec.stage)), params, self.settings)
        job = build_pytorchjob(full, params, self.opts)
        return job, params_configmap(Path(spec.params_file), params, self.opts.namespace)

    def submit(self, spec: JobSpec) -> JobHandle:
        job, cm = self.render(spec)
        name = self.client.submit(job, cm, replace_finished=True)  # a retry replaces the failed attempt
        return JobHandle(self.kind, name, Path(spec.run_dir), {"namespace": self.opts.namespace})

    def wait(self, handle: JobHandle, timeout_s: float | None = None) -> JobOutcome:
        start, seen, stuck_since = time.monotonic(), None, {}
        while True:
            try:
                job = self.client.get(handle.name)
            except ClusterError as e:
                if seen is not None and "not found" in str(e):  # it existed and is gone: deleted (k8s cancel, kubectl)
                    return JobOutcome(CANCELLED, 130, f"PyTorchJob {self.opts.namespace}/{handle.name} was deleted "
                                                      f"while {job_state(seen)}")
                raise
            seen = job
            if job_state(job) in ("Succeeded", "Failed"):
                return outcome_of(job)
            now = time.monotonic()
            for pod, why in self.client.stuck_pods(handle.name).items():
                if now - stuck_since.setdefault(pod, now) >= self.opts.stuck_grace_s:
                    self.client.cancel(handle.name)  # its other pods would hold their nodes while it never starts
                    return JobOutcome(FAILED, 1, f"pod {pod} cannot start: {why} (waited "
                                                 f"{now - stuck_since[pod]:.0f}s; the job was deleted)")
            if timeout_s is not None and now - start > timeout_s:
                return outcome_of(job, timeout_s)
            time.sleep(self.poll_s)

    def logs(self, handle: JobHandle) -> str:
        """Every pod's log (a Worker's exception is only in its own), the Master's first."""
        return "\n".join(f"[{pod}] {text}" for pod, text in self.client.logs(handle.name, all_pods=True).items())

    def record(self, handle: JobHandle) -> dict[str, Any]:
        """The job's identity and its device-hours from its own start and completion times."""
        job = self.client.get(handle.name)
        meta, ann = job.get("metadata") or {}, (job.get("metadata") or {}).get("annotations") or {}
        status = job.get("status") or {}
        master = ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).get("Master") or {}
        image = next(iter(((master.get("template") or {}).get("spec") or {}).get("containers") or []), {}).get("image")
        progress = job_progress(job)
        return {"launcher": self.kind, "namespace": meta.get("namespace"), "name": meta.get("name"),
                "uid": meta.get("uid"), "pool": (meta.get("labels") or {}).get("motus/pool"),
                "nodes": ann.get("motus/nodes"), "gpus_per_node": ann.get("motus/gpus-per-node"), "image": image,
                "start": status.get("startTime"), "completion": status.get("completionTime"),
                "restarts": progress["restarts"], "queued_s": progress["queued_s"],
                "devices": _devices(job), "device_hours": progress["device_hours"]}

    def cancel(self, handle: JobHandle) -> None:
        self.client.cancel(handle.name)


def outcome_of(job: dict[str, Any], timeout_s: float | None = None) -> JobOutcome:
    """How a job that stopped being watched ended, in the launchers' terms. A job that failed after using up
    its restarts on exits that `restartPolicy: ExitCode` retries (>= 128: signals, evictions, the OOM killer) was
    killed from outside, like an evicted one: infrastructure, retryable. Any other failure is the job's own."""
    state = job_state(job)
    if state == "Succeeded":
        return JobOutcome(SUCCEEDED, 0)
    conds = (job.get("status") or {}).get("conditions") or []
    last = next((c for c in reversed(conds) if c.get("type") == state), {})
    message = last.get("message", "")
    if state == "Failed":
        evicted = (any(w in message.lower() for w in ("evict", "preempt", "backoff limit"))
                   or last.get("reason") in ("Evicted", "Preempted"))
        return JobOutcome(KILLED if evicted else FAILED, 137 if evicted else 1, message or "Failed")
    return JobOutcome(KILLED, 124, f"still {state} after {timeout_s}s")


def required_secrets(job: dict[str, Any]) -> list[str]:
    """Secrets the job's containers reference without `optional: true`."""
    names: set[str] = set()
    for replica in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values():
        pod = (replica.get("template") or {}).get("spec") or {}
        for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    names.add(ref["name"])
    return sorted(names)


def quota_problem(job: dict[str, Any], kueue_dir: Path) -> str | None:
    """Why Kueue could never admit the job (more GPUs than its queue's ClusterQueue quota in `kueue_dir`, the
    manifests `k8s/kueue` applies), or None; None too when those manifests are not here to read."""
    queue = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
    if not queue or not kueue_dir.is_dir():
        return None
    docs = [d for f in sorted(kueue_dir.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    local = next((d for d in docs if d.get("kind") == "LocalQueue" and d["metadata"]["name"] == queue), None)
    if local is None:
        return None
    cq = next((d for d in docs if d.get("kind") == "ClusterQueue"
               and d["metadata"]["name"] == local["spec"]["clusterQueue"]), None)
    if cq is None:
        return None
    quota = sum(int(r["nominalQuota"]) for g in cq["spec"].get("resourceGroups") or [] for f in g.get("flavors") or []
                for r in f.get("resources") or [] if r["name"] == "nvidia.com/gpu")
    ann = job["metadata"].get("annotations") or {}
    nodes, gpus = int(ann.get("motus/nodes", 1)), int(ann.get("motus/gpus-per-node", 0))
    if gpus and nodes * gpus > quota:
        return (f"{nodes} nodes x {gpus} GPUs = {nodes * gpus} GPUs exceeds the quota of queue {queue} "
                f"(ClusterQueue {cq['metadata']['name']}: {quota} GPUs, {kueue_dir}); Kueue would never admit it: "
                f"use at most {quota // gpus} nodes (`cluster.nodes` in params.yaml or --nodes)")
    return None


def _why(e: RuntimeError) -> str:
    cause = e.__cause__
    if getattr(cause, "status", None) == 404:
        return "not found"
    if cause is not None and getattr(cause, "status", None):
        return f"{cause.status} {cause.reason}"
    return str(e)
