"""`motus k8s`: a stage job as a Kubeflow PyTorchJob: render, validate, submit, status, logs, cancel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

k8s_app = typer.Typer(no_args_is_help=True, help="Run stage jobs on Kubernetes (Kubeflow PyTorchJobs, Kueue).")

Stage = Annotated[str, typer.Option("--stage", "-s", help="Stage number (1, 2, 3) or its params.yaml key.")]
PoolOpt = Annotated[str, typer.Option("--pool", help="GPU pool from params.yaml `pools` (a100, h100).")]
Nodes = Annotated[int, typer.Option("--nodes", "-N", min=1, help="Nodes: 1 Master + N-1 Workers.")]
Kubeconfig = Annotated[Path | None, typer.Option(help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config).")]
Context = Annotated[str | None, typer.Option(help="kubeconfig context.")]
Namespace = Annotated[str, typer.Option("--namespace", "-n", help="Namespace of the jobs (k8s/base).")]


def _fail(msg: Any) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


def _render(stage: str, pool: str, nodes: int, gpus_per_node: int | None, image: str | None, name: str | None,
            namespace: str, run_dir: Path | None, init_from: str | None, max_steps: int | None,
            elastic_min: int | None, elastic_max: int | None, checkpoint_remote: str | None,
            backoff_limit: int, params_path: Path | None) -> tuple[Any, dict, dict]:
    """(job model, job manifest, params ConfigMap); every problem becomes `error: ...`."""
    from ..config import ConfigError, get_settings, load_params, stage_key
    from ..contracts import JobSpec
    from ..launch.kubernetes import (
        ClusterOptions,
        build_pytorchjob,
        cluster_spec,
        params_configmap,
        to_manifest,
    )

    try:
        settings = get_settings()
        params_file = params_path or settings.params_file
        params = load_params(params_file)
        key = stage_key(params, stage)
        spec = cluster_spec(JobSpec(stage=key, run_dir=run_dir or Path("outputs/runs") / key,
                                    params_file=Path(params_file), nodes=nodes, pool=pool, image=image,
                                    init_from=init_from, max_steps=max_steps), params, settings)
        if gpus_per_node:
            spec = spec.with_updates(procs_per_node=gpus_per_node)
        opts = ClusterOptions.from_settings(settings, namespace=namespace, name=name,
                                            elastic_min_nodes=elastic_min, elastic_max_nodes=elastic_max,
                                            checkpoint_remote=checkpoint_remote, backoff_limit=backoff_limit)
        job = build_pytorchjob(spec, params, opts)
        return job, to_manifest(job), params_configmap(Path(params_file), params, namespace)
    except (ConfigError, ValueError, OSError) as e:
        _fail(e)
        raise  # unreachable; keeps type checkers calm


def _check(docs: list[dict], crd: list[Path]) -> None:
    from ..launch.k8s_validate import validate_documents

    try:
        verdicts = validate_documents(docs, crd_paths=crd)
    except (FileNotFoundError, ValueError) as e:
        _fail(e)
    bad = [f"{v.kind}/{v.name}: {p}" for v in verdicts for p in v.problems]
    if bad:
        _fail("the rendered job would be rejected:\n  " + "\n  ".join(bad))


def _launcher(kubeconfig: Path | None, context: str | None, namespace: str) -> Any:
    from ..launch.kubernetes import ClusterClient, ClusterError

    try:
        return ClusterClient(kubeconfig, context=context, namespace=namespace)
    except ClusterError as e:
        _fail(e)


@k8s_app.command()
def render(
    stage: Stage,
    pool: PoolOpt = "h100",
    nodes: Nodes = 1,
    gpus_per_node: Annotated[int | None, typer.Option(min=1, help="Processes per node; default: the pool's GPUs.")] = None,
    image: Annotated[str | None, typer.Option(help="Training image (default: MOTUS_IMAGE).")] = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: motus-<stage>-<config hash>).")] = None,
    namespace: Namespace = "motus",
    run_dir: Annotated[Path | None, typer.Option(help="Run folder on the workspace volume (default outputs/runs/<stage>).")] = None,
    init_from: Annotated[str | None, typer.Option(help="Parent model export (Stage 2/3), a path on the volume.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    elastic_min: Annotated[int | None, typer.Option(help="Elastic job: fewest nodes.")] = None,
    elastic_max: Annotated[int | None, typer.Option(help="Elastic job: most nodes.")] = None,
    checkpoint_remote: Annotated[str | None, typer.Option(help="s3://bucket/prefix mirror of checkpoints "
                                                               "(default: s3://<data-remote bucket>/runs).")] = None,
    backoff_limit: Annotated[int, typer.Option(min=0, help="Restarts of failed pods before the job fails.")] = 3,
    params: Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml to read.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the YAML here instead of stdout.")] = None,
) -> None:
    """Print the params ConfigMap and the PyTorchJob for a stage job (YAML, `kubectl apply -f -` ready)."""
    from ..launch.kubernetes import dump_yaml

    _, job, cm = _render(stage, pool, nodes, gpus_per_node, image, name, namespace, run_dir, init_from, max_steps,
                         elastic_min, elastic_max, checkpoint_remote, backoff_limit, params)
    text = dump_yaml([cm, job])
    if out:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)
    else:
        sys.stdout.write(text)


@k8s_app.command()
def validate(
    paths: Annotated[list[Path] | None, typer.Argument(help="YAML files, or Kustomize folders (rendered with "
                                                            "`kubectl kustomize`); '-' reads stdin.")] = None,
    crd: Annotated[list[Path] | None, typer.Option(help="Extra CRD files to validate custom resources against.")] = None,
    pytorchjob_crd: Annotated[Path | None, typer.Option(envvar="MOTUS_PYTORCHJOB_CRD",
                                                        help="PyTorchJob CRD (default: ../shared/reference/crds/).")] = None,
    from_cluster: Annotated[bool, typer.Option(help="Read the PyTorchJob CRD installed in the cluster.")] = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Validate manifests offline: core objects strictly, PyTorchJobs against the CRD + the operator's rules."""
    import os

    import yaml

    from ..launch import k8s_validate as kv

    docs: list[tuple[str, Any]] = []
    for p in paths or [Path("-")]:
        try:
            if str(p) == "-":
                text, label = sys.stdin.read(), "stdin"
            elif p.is_dir():
                text, label = _kustomize(p), str(p)
            else:
                text, label = p.read_text(), str(p)
            docs += [(label, d) for d in yaml.safe_load_all(text) if d is not None]
        except (OSError, yaml.YAMLError, RuntimeError) as e:
            _fail(f"{p}: {e}")
    extra = list(crd or [])
    if from_cluster:
        import tempfile

        launcher = _launcher(kubeconfig, context, "default")
        launcher.ping()
        tmp = Path(tempfile.mkstemp(suffix=".yaml")[1])
        tmp.write_text(yaml.safe_dump(kv.crd_from_cluster(launcher.api_client)))
        pytorchjob_crd = tmp
    if pytorchjob_crd:
        os.environ[kv.CRD_ENV] = str(pytorchjob_crd)
    failed = skipped = 0
    for label, doc in docs:
        try:
            (verdict,) = kv.validate_documents([doc], crd_paths=extra)
        except (FileNotFoundError, ValueError) as e:
            _fail(e)
        if verdict.skipped:
            skipped += 1
            typer.echo(f"skip  {label}: {verdict.kind}/{verdict.name} (custom resource without a CRD; pass --crd)")
        elif verdict.ok:
            typer.echo(f"ok    {label}: {verdict.kind}/{verdict.name} ({verdict.checked_with})")
        else:
            failed += 1
            for problem in verdict.problems:
                typer.echo(f"error: {label}: {verdict.kind}/{verdict.name}: {problem}", err=True)
    typer.echo(f"{len(docs) - failed - skipped} valid, {skipped} skipped, {failed} invalid")
    if failed or not docs:
        raise typer.Exit(1)


def _kustomize(folder: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found (needed to render a Kustomize folder)")
    proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize failed: {proc.stderr.strip()}")
    return proc.stdout


@k8s_app.command()
def submit(
    stage: Stage,
    pool: PoolOpt = "h100",
    nodes: Nodes = 1,
    gpus_per_node: Annotated[int | None, typer.Option(min=1, help="Processes per node; default: the pool's GPUs.")] = None,
    image: Annotated[str | None, typer.Option(help="Training image (default: MOTUS_IMAGE).")] = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: motus-<stage>-<config hash>).")] = None,
    namespace: Namespace = "motus",
    run_dir: Annotated[Path | None, typer.Option(help="Run folder on the workspace volume.")] = None,
    init_from: Annotated[str | None, typer.Option(help="Parent model export (Stage 2/3), a path on the volume.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    elastic_min: Annotated[int | None, typer.Option(help="Elastic job: fewest nodes.")] = None,
    elastic_max: Annotated[int | None, typer.Option(help="Elastic job: most nodes.")] = None,
    checkpoint_remote: Annotated[str | None, typer.Option(help="s3://bucket/prefix mirror of checkpoints.")] = None,
    backoff_limit: Annotated[int, typer.Option(min=0, help="Restarts of failed pods before the job fails.")] = 3,
    params: Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml to read.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the YAML; submit nothing.")] = False,
    crd: Annotated[list[Path] | None, typer.Option(help="Extra CRD files for validation.")] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Validate and submit a stage job as a PyTorchJob (through the kubeflow-training TrainingClient)."""
    from ..launch.kubernetes import ClusterError, dump_yaml

    job, pytorchjob, cm = _render(stage, pool, nodes, gpus_per_node, image, name, namespace, run_dir, init_from,
                                max_steps, elastic_min, elastic_max, checkpoint_remote, backoff_limit, params)
    _check([cm, pytorchjob], list(crd or []))
    if dry_run:
        sys.stdout.write(dump_yaml([cm, pytorchjob]))
        return
    launcher = _launcher(kubeconfig, context, namespace)
    try:
        launcher.submit(job, cm)
    except ClusterError as e:
        _fail(e)
    meta = pytorchjob["metadata"]
    queue = meta["labels"].get("kueue.x-k8s.io/queue-name")
    typer.echo(f"submitted PyTorchJob {namespace}/{meta['name']}: {nodes} node(s) x "
               f"{pytorchjob['spec']['nprocPerNode']} process(es) on pool {pool}"
               + (f", queue {queue}" if queue else ""))
    typer.echo(f"follow: motus k8s logs {meta['name']} --follow")


@k8s_app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Job name; none lists the namespace's jobs.")] = None,
    namespace: Namespace = "motus",
    params: Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml (for prices).")] = None,
    workspace: Annotated[Path, typer.Option(help="Where the jobs' workspace volume is visible here (the project "
                                                 "folder): a job's goodput is read from its run folder's metrics.")]
    = Path("."),
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Phase (queued, running, restarting, succeeded, failed), nodes, GPU hours (nodes x GPUs x wall hours), cost,
    restarts, time queued, and goodput where the run folder can be read."""
    from ..config import ConfigError, get_settings, load_params
    from ..launch.kubernetes import ClusterError, job_progress
    from ..track.accounting import cost

    launcher = _launcher(kubeconfig, context, namespace)
    try:
        jobs = [launcher.get(name)] if name else launcher.list()
    except ClusterError as e:
        _fail(e)
    try:
        prices = load_params(params or get_settings().params_file).costs.device_hour
    except ConfigError:
        prices = {}
    if not jobs:
        typer.echo(f"no PyTorchJobs in namespace {namespace}")
    for job in jobs:
        meta = job.get("metadata") or {}
        ann = meta.get("annotations") or {}
        p = job_progress(job, workspace)
        hours = p["gpu_hours"]
        money = cost(hours, ann.get("motus/gpu", ""), prices) if hours is not None else None
        good = ("" if p["goodput"] is None else
                f" goodput={p['goodput']:.0%} (lost {p['lost_device_hours']:.3f} device h, "
                f"{int(p['redone_steps'])} steps redone)")
        typer.echo(f"{meta.get('name')}: {p['phase']}  nodes={p['nodes']} gpus/node={ann.get('motus/gpus-per-node', '?')}"
                   f" gpu_hours={'-' if hours is None else f'{hours:.3f}'}"
                   + (f" cost={money:.2f}" if money is not None else "")
                   + f" restarts={p['restarts']}"
                   + ("" if p["queued_s"] is None else f" queued={p['queued_s']:.0f}s") + good)
        for c in ((job.get("status") or {}).get("conditions") or []):
            typer.echo(f"  {c.get('lastTransitionTime', '')} {c.get('type')}={c.get('status')} {c.get('message', '')}")


@k8s_app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Job name.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the pod ends.")] = False,
    worker: Annotated[int | None, typer.Option(help="A Worker's index instead of the Master.")] = None,
    namespace: Namespace = "motus",
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Logs of the job's Master pod (or one Worker)."""
    from ..launch.kubernetes import ClusterError

    launcher = _launcher(kubeconfig, context, namespace)
    try:
        out = launcher.logs(name, follow=follow, worker=worker)
    except ClusterError as e:
        _fail(e)
    if not follow:  # when following, the SDK has printed each line as it came
        for pod, text in out.items():
            for line in text.splitlines():
                typer.echo(f"[{pod}] {line}")
    if not out:
        typer.echo(f"no running pods for {name} yet", err=True)


@k8s_app.command()
def cancel(
    name: Annotated[str, typer.Argument(help="Job name.")],
    namespace: Namespace = "motus",
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Delete the job (its pods stop; checkpoints stay on the volume and in the object store)."""
    from ..launch.kubernetes import ClusterError

    launcher = _launcher(kubeconfig, context, namespace)
    try:
        launcher.cancel(name)
    except ClusterError as e:
        _fail(e)
    typer.echo(f"cancelled PyTorchJob {namespace}/{name}")


@k8s_app.command("sync-params")
def sync_params(
    params: Annotated[Path, typer.Option("--params", "-p", help="params.yaml to copy.")] = Path("params.yaml"),
    base: Annotated[Path, typer.Option(help="Kustomize base folder.")] = Path("k8s/base"),
) -> None:
    """Copy params.yaml into the Kustomize base (Kustomize reads files only below its own folder)."""
    if not params.is_file() or not base.is_dir():
        _fail(f"need {params} and {base}/")
    shutil.copyfile(params, base / "params.yaml")
    typer.echo(f"copied {params} -> {base / 'params.yaml'}")
