"""The generic trainer's contract, on a toy train module and a real DeepSpeed engine (in a subprocess: the
process group must not live in the pytest process): the cadence of validation, checkpoints and export, the
metrics sink, a stop at `max_steps`, and an exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TOY_JOB = r'''
import json, sys
from pathlib import Path
import torch
from motus.config import Params
from motus.train.distributed import init_distributed
from motus.train.engine import deepspeed_config
from motus.train.trainer import Cadence, Trainer, TrainModule

class Toy(TrainModule):
    name = "toy"
    reported = ("loss", "fit")

    def __init__(self, run_dir, ctx, max_steps=None):
        super().__init__(Params(), run_dir, ctx, None, precision="fp32", config_hash="toy", max_steps=max_steps,
                         cadence=Cadence(steps=6, batch_size=4, validate_every=2, checkpoint_every=3))
        self.calls = []

    def build(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)

    def optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=0.05), None

    def ds_config(self):
        return deepspeed_config("toy", batch_size=4, world=1, grad_clip=1.0, zero_stage=0)

    def loss(self, engine, step):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        loss = ((engine(x) - x.sum(1, keepdim=True)) ** 2).mean()
        return {"loss": loss, "fit": loss.detach() * 2}

    def validate(self, engine, step):
        self.calls.append(["validate", step])
        return {}

    def export(self, engine, checkpoint, hours, wall):
        self.calls.append(["export", Path(checkpoint).name])
        (self.run_dir / "export").mkdir()
        return self.run_dir / "export"
'''

# the toy job's main: three runs of the toy (whole, stopped at step 4, resumed); TOY_JOB (above) is also the
# job other tests drive their own way (tests/track/test_outage.py)
TOY = TOY_JOB + r'''
import dataclasses
root = Path(sys.argv[1])
ctx = init_distributed()
out = {}
# both ways of saving: in the background (the default) and with the loop waiting (the stopped run)
for key, folder, max_steps, background in (("whole", "a", None, True), ("stopped", "b", 4, False),
                                           ("resumed", "b", None, True)):
    toy = Toy(root / folder, ctx, max_steps)
    toy.cadence = dataclasses.replace(toy.cadence, async_checkpoints=background)
    r = Trainer(toy).run()
    out[key] = {"steps": r.steps, "losses": r.losses, "calls": toy.calls, "resumed_from": str(r.resumed_from),
                "export": str(r.export_dir), "hours": r.device_hours,
                "checkpoints": sorted(p.name for p in (root / folder / "checkpoints").glob("step-*"))}
print(json.dumps(out))
'''


def test_cadence_metrics_stop_and_exact_resume(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    whole = out["whole"]
    assert whole["steps"] == 6 and [s for s, _ in whole["losses"]] == [1, 2, 3, 4, 5, 6]
    # validation every 2 steps, checkpoints every 3 (and at the end), the export once, from the last checkpoint
    assert whole["calls"] == [["validate", 2], ["validate", 4], ["validate", 6], ["export", "step-000006"]]
    assert whole["checkpoints"] == ["step-000003", "step-000006"] and whole["export"].endswith("a/export")
    assert whole["hours"] > 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == {"step", "train/loss", "train/fit"} for r in rows)
    assert rows[0]["train/fit"] == 2 * rows[0]["train/loss"]
    losses = dict((s, v) for s, v in whole["losses"])

    # stopped at max_steps: no export; the newest complete checkpoint is the last one the cadence wrote
    stopped = out["stopped"]
    assert stopped["steps"] == 4 and stopped["export"] == "None" and stopped["checkpoints"] == ["step-000003"]
    assert ["export", "step-000003"] not in stopped["calls"]

    # run again: resumes from step 3 and continues with exactly the uninterrupted run's losses
    resumed = out["resumed"]
    assert resumed["resumed_from"].endswith("step-000003")
    assert [s for s, _ in resumed["losses"]] == [4, 5, 6]
    assert resumed["losses"] == [[s, losses[s]] for s in (4, 5, 6)]
    assert resumed["calls"] == [["validate", 4], ["validate", 6], ["export", "step-000006"]]
