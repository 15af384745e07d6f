"""The per-process entry point of a training job: `python -m motus.launch.worker --stage ... --run-dir ...`.

torchrun (local) or the PyTorchJob's pods (kubernetes) start one of these per device. Rank 0 opens (or,
on resume, reopens) the job's single MLflow run; the others report nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..contracts import ContractError, JobSpec, mask_process_output, mask_secrets

# The exit code of a process whose peer went away (another node of the job was evicted or crashed): not this
# job's fault, so it is in the range the Training Operator's restartPolicy ExitCode retries (128-255).
PEER_LOST = 200
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another process of a multi-process job is gone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", None)
    return (backend_error is not None and isinstance(e, backend_error)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_GONE))


def main(argv: list[str] | None = None) -> int:
    mask_process_output()  # the job's log: no credential of its environment (a warm job's streams are its own)
    try:
        return _main(argv)
    except Exception as e:
        if not peer_lost(e):
            raise
        import traceback

        traceback.print_exc()
        print(f"motus worker: a peer of this job is gone ({type(e).__name__}); exiting {PEER_LOST} so the "
              "job restarts and resumes from its latest checkpoint", file=sys.stderr)
        return PEER_LOST


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="motus.launch.worker", description=__doc__)
    ap.add_argument("--spec", default=None,
                    help="The job as a JobSpec JSON object (or @FILE): what every launcher passes.")
    ap.add_argument("--stage", help="Without --spec: a params.yaml stage, or 'latent-action' for the VAE job.")
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--params", type=Path, default=None)
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                    help="Overrides params.yaml's precision for this job.")
    ap.add_argument("--no-track", action="store_true")
    args = ap.parse_args(argv)
    spec = _spec(ap, args)
    # Motus compiles nothing, but DeepSpeed's ZeRO optimizer check imports its Muon optimizer, whose module
    # torch.compile()s a kernel at import: 2.5 s of every job on a 2-core CPU, for an optimizer never used. With
    # dynamo off that decorator is a no-op. A job that wants dynamo sets TORCHDYNAMO_DISABLE=0 in its env.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s", stream=sys.stdout)

    from ..config import ConfigError, get_settings, load_params, stage_key

    settings = get_settings()
    try:
        params = load_params(spec.params_file)
        stage = stage_key(params, spec.stage)
    except (ConfigError, ValueError) as e:  # a job that cannot start says why in one line, on every rank
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = spec.run_dir
    from ..track.accounting import git_state

    tracker = None
    git = git_state(Path.cwd())
    code = {"commit": git["commit"], "dirty": git["dirty"]}
    if rank == 0 and spec.track:
        from ..track import MlflowTracker

        run_dir.mkdir(parents=True, exist_ok=True)
        run_file = run_dir / "run.json"
        run_id = json.loads(run_file.read_text())["mlflow_run_id"] if run_file.exists() else None
        tracker = MlflowTracker(settings.tracking_uri, experiment=params.project.name,
                                run_name=f"{stage}-{run_dir.name}", run_id=run_id,
                                tags={"code.commit": git["commit"], "code.dirty": str(git["dirty"]).lower()},
                                # a store that goes away mid-run: the job goes on, its points wait in the run folder
                                buffer_dir=run_dir, buffer_mb=settings.tracking_buffer_mb)
        if run_id is None:
            tracker.log_params({"code": {"commit": git["commit"], "dirty": git["dirty"]}})
        run_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id,
                                        "tracking_uri": mask_secrets(settings.tracking_uri)}))
    status = "FAILED"
    try:
        if stage == "latent-action":
            from ..train.latent_action import run_latent_action

            out = run_latent_action(params, run_dir, tracker, max_steps=spec.max_steps, precision=spec.precision,
                                    code=code)
            status = "FINISHED"
            if rank == 0:
                print(json.dumps(out))
            return 0
        from ..train.stage import run_stage  # the Motus model (diffusers, seconds to import): stage jobs only

        result = run_stage(params, stage, run_dir, tracker, init_from=spec.init_from, max_steps=spec.max_steps,
                           precision=spec.precision, code=code)
        status = "FINISHED"
        if rank == 0:
            print(json.dumps({"stage": result.name, "steps": result.steps, "export": str(result.export_dir),
                              "device_hours": result.device_hours, "final_loss": result.losses[-1][1]
                              if result.losses else None}))
        return 0
    finally:
        if tracker is not None:
            tracker.finish(status)


def _spec(ap: argparse.ArgumentParser, args: argparse.Namespace) -> JobSpec:
    """The job this process runs: `--spec` (what launchers pass), or a spec built from the single flags (a
    person starting one worker by hand)."""
    if args.spec is not None:
        flags = [f for f in ("stage", "run_dir", "params", "init_from", "max_steps", "precision")
                 if getattr(args, f) is not None] + (["no_track"] if args.no_track else [])
        if flags:
            ap.error(f"--spec carries the whole job; drop {', '.join('--' + f.replace('_', '-') for f in flags)}")
        try:
            text = Path(args.spec[1:]).read_text() if args.spec.startswith("@") else args.spec
            return JobSpec.from_json(json.loads(text), "--spec")
        except (OSError, json.JSONDecodeError, ContractError) as e:
            ap.error(f"--spec: {e}")
    if args.stage is None or args.run_dir is None:
        ap.error("give --spec, or --stage and --run-dir")
    from ..config import get_settings

    return JobSpec(stage=args.stage, run_dir=args.run_dir, params_file=args.params or get_settings().params_file,
                   init_from=args.init_from, max_steps=args.max_steps, precision=args.precision,
                   track=not args.no_track)


if __name__ == "__main__":
    sys.exit(main())
