"""The evaluation report: what `evaluate_model` returns. Recording it (an MLflow evaluation run linked to the
model version) is the track room's job: `motus.track.evaluations`.

The run sits in the training experiment, tagged `motus.run_kind=evaluation`, `motus.evaluation.model`,
`motus.evaluation.version`; the version gets the tag `motus.evaluation_run=<run id>`, which is where the
registry's gates read metrics first. Artifacts: `evaluation/report.json` (every number, every rollout, the
settings and the floors/ceilings beside the model), `evaluation/rollouts/*.mp4`, `evaluation/wm_frames.png`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    export_dir: str
    model_name: str | None = None
    version: str | None = None
    run_id: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    offline: dict[str, Any] = field(default_factory=dict)
    not_reported: dict[str, str] = field(default_factory=dict)  # metric -> why it is absent
    lineage: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    videos: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # file name -> frames [T, H, W, 3]
    wm_frames: np.ndarray | None = field(default=None, repr=False)  # [2, F-1, H, W, 3] real / predicted
    # what it takes to get the same numbers again: seeds, tasks, draws, windows, the tiers' content hashes as
    # evaluated and the simulator / framework package versions (`reproducibility`); the verdict carries it
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("videos"), d.pop("wm_frames")
        d["videos"] = sorted(self.videos)
        d["metrics"] = {k: _json_number(v) for k, v in self.metrics.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def summary(self) -> str:
        """A few lines for a terminal: the model beside its floors and ceiling."""
        m, lines = self.metrics, []
        for task in self.settings.get("tasks", []):
            row = [f"{task}: model {_pct(m.get(f'eval/{task}/success_rate'))}"]
            if f"eval/{task}/joint_success_rate" in m:
                row.append(f"joint {_pct(m[f'eval/{task}/joint_success_rate'])}")
            row.append(f"zero {_pct(m.get(f'eval/{task}/floor_zero_success_rate'))}")
            row.append(f"random {_pct(m.get(f'eval/{task}/floor_random_success_rate'))}")
            row.append(f"scripted {_pct(m.get(f'eval/{task}/ceiling_success_rate'))}")
            lines.append(", ".join(row))
        for key, floor in (("eval/vla_action_mse", "eval/floor_zero_action_mse"),
                           ("eval/idm_action_mse", "eval/floor_zero_action_mse"),
                           ("eval/joint_action_mse", "eval/floor_zero_action_mse")):
            if key in m:
                lines.append(f"{key.split('/')[1]}: {m[key]:.4f} (zero actions {m.get(floor, math.nan):.4f})")
        if "eval/wm_psnr" in m:
            lines.append(f"world model: PSNR {m['eval/wm_psnr']:.2f} dB, SSIM {m['eval/wm_ssim']:.3f} (copy first frame "
                         f"{m['eval/wm_floor_copy_psnr']:.2f} dB; VAE reconstruction {m['eval/wm_ceiling_vae_psnr']:.2f} dB)")
        for name, why in self.not_reported.items():
            lines.append(f"{name}: not reported ({why})")
        return "\n".join(lines)


# the packages whose versions decide an evaluation's numbers: the simulators and the frameworks the model runs on
EVALUATION_PACKAGES = ("motus", "torch", "numpy", "mujoco", "dm-control", "gym-aloha", "gymnasium", "metaworld")


def reproducibility(settings: dict[str, Any], tiers: dict[str, str], noise_seed: int) -> dict[str, Any]:
    """The evaluation's reproducibility record: its settings that change numbers, the noise seed, the evaluated
    tiers' content hashes and the installed versions of `EVALUATION_PACKAGES` (absent ones as "not installed")."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def ver(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    keys = ("modes", "tasks", "seeds", "max_steps", "sample_steps", "windows_per_tier", "draws")
    record = {k: settings.get(k) for k in keys}
    seeds = list(record["seeds"] or [])
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        record["seeds"] = f"{seeds[0]}..{seeds[-1]}"  # a run's tags hold 8,000 characters: ranges stay short
    return {**record, "noise_seed": int(noise_seed), "tiers": dict(sorted(tiers.items())),
            "packages": {p: ver(p) for p in EVALUATION_PACKAGES}}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _json_number(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # JSON has no inf/nan
