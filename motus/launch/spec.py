"""The job spec: the one description of a training job that every launcher takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class JobSpec:
    stage: str  # params.yaml stage key
    run_dir: Path  # checkpoints, metrics.jsonl, export
    params_file: Path
    nodes: int = 1
    procs_per_node: int = 1  # GPUs per node on a cluster; processes on a CPU machine
    pool: str | None = None
    image: str | None = None  # container image (kubernetes)
    init_from: str | None = None  # parent model export (Stage 2/3)
    max_steps: int | None = None
    precision: str | None = None  # auto | bf16 | fp32; None = what params.yaml says for this job
    track: bool = True
    env: dict[str, str] = field(default_factory=dict)

    def worker_args(self) -> list[str]:
        args = ["--stage", self.stage, "--run-dir", str(self.run_dir), "--params", str(self.params_file)]
        if self.init_from:
            args += ["--init-from", str(self.init_from)]
        if self.max_steps:
            args += ["--max-steps", str(self.max_steps)]
        if self.precision:
            args += ["--precision", self.precision]
        if not self.track:
            args.append("--no-track")
        return args

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"], d["params_file"] = str(self.run_dir), str(self.params_file)
        return d
