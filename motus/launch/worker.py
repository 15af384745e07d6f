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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="motus.launch.worker", description=__doc__)
    ap.add_argument("--stage", required=True, help="A params.yaml stage, or 'latent-action' for the VAE job.")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--params", type=Path, default=None)
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                    help="Overrides params.yaml's precision for this job.")
    ap.add_argument("--no-track", action="store_true")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s", stream=sys.stdout)

    from ..config import get_settings, load_params, stage_key

    settings = get_settings()
    params = load_params(args.params or settings.params_file)
    stage = stage_key(params, args.stage)
    from ..track.accounting import git_state

    tracker = None
    git = git_state(Path.cwd())
    code = {"commit": git["commit"], "dirty": git["dirty"]}
    if rank == 0 and not args.no_track:
        from ..track import MlflowTracker

        args.run_dir.mkdir(parents=True, exist_ok=True)
        run_file = args.run_dir / "run.json"
        run_id = json.loads(run_file.read_text())["mlflow_run_id"] if run_file.exists() else None
        tracker = MlflowTracker(settings.tracking_uri, experiment=params.project.name,
                                run_name=f"{stage}-{args.run_dir.name}", run_id=run_id,
                                tags={"code.commit": git["commit"], "code.dirty": str(git["dirty"]).lower()})
        if run_id is None:
            tracker.log_params({"code": {"commit": git["commit"], "dirty": git["dirty"]}})
        run_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": settings.tracking_uri}))
    status = "FAILED"
    try:
        if stage == "latent-action":
            from ..train.latent_action import run_latent_action

            out = run_latent_action(params, args.run_dir, tracker, max_steps=args.max_steps, precision=args.precision,
                                    code=code)
            status = "FINISHED"
            if rank == 0:
                print(json.dumps(out))
            return 0
        from ..train.loop import run_stage  # the Motus model (diffusers, seconds to import): stage jobs only

        result = run_stage(params, stage, args.run_dir, tracker, init_from=args.init_from, max_steps=args.max_steps,
                           precision=args.precision, code=code)
        status = "FINISHED"
        if rank == 0:
            print(json.dumps({"stage": result.stage, "steps": result.steps, "export": str(result.export_dir),
                              "device_hours": result.device_hours, "final_loss": result.losses[-1][1]
                              if result.losses else None}))
        return 0
    finally:
        if tracker is not None:
            tracker.finish(status)


if __name__ == "__main__":
    sys.exit(main())
