"""Pipeline overhead: wall time of `motus pipeline run` / the sum of its steps' compute (goal <= 1.05).

Runs the shipped recipe, shrunk to seconds per step (the tests' small project), in a fresh folder with the
embedded services (ephemeral Prefect, SQLite MLflow, a local DVC remote), then again with everything cached.
"Compute" is the time inside each step's executor (ingest, flow, a training job, evaluation); the rest is the
platform: Prefect, the step ledger, the registry, cache checks. Printed as ratios.

    python benchmarks/pipeline.py [--steps 6] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.project import MOTUS, make_project, project_env  # noqa: E402


def run(proj: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([str(MOTUS), "pipeline", "run"], cwd=proj, env=project_env(proj), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"pipeline failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return wall, json.loads((proj / "outputs" / "pipeline" / "last-run.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="training steps per stage")
    ap.add_argument("--keep", type=Path, default=None, help="keep the project here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proj = make_project((args.keep or Path(tmp)) / "bench-pipeline", steps=args.steps)
        wall, rep = run(proj)
        compute = rep["compute_seconds"]
        by_kind: dict[str, float] = {}
        for s in rep["steps"]:
            by_kind[s["kind"]] = by_kind.get(s["kind"], 0.0) + s["seconds"] - s["compute_seconds"]
        print(f"first run: {len(rep['steps'])} steps, compute {compute:.1f}s")
        print(f"  flow wall / compute            = {rep['wall_seconds'] / compute:.3f}   (goal <= 1.05)")
        print(f"  process wall / compute         = {wall / compute:.3f}   (adds CLI start-up and ephemeral Prefect)")
        for kind, sec in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  platform time in {kind:<15} = {sec / compute:.3f} of compute")
        wall2, rep2 = run(proj)
        cached = sum(s["status"] == "cached" for s in rep2["steps"])
        print(f"second run: {cached}/{len(rep2['steps'])} steps cached")
        print(f"  cached run wall / first run wall = {wall2 / wall:.3f}")


if __name__ == "__main__":
    main()
