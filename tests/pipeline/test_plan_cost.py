"""What `motus pipeline plan` promises before anything runs: device-hours per pool and their cost."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from motus.config import Settings, load_params
from motus.pipeline.pipeline import PlanRow, Step
from motus.pipeline.report import plan_totals, print_plan
from motus.pipeline.steps.training import LatentActionStep, StageStep

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def params():
    p = load_params(PARAMS)
    return p.model_copy(update={"stages": {**p.stages, "stage1": p.stages["stage1"].model_copy(
        update={"cluster": p.stages["stage1"].cluster.model_copy(update={"pool": "h100", "nodes": 4})})}})


def _ctx(params, **env) -> SimpleNamespace:
    return SimpleNamespace(params=params, settings=Settings(**env), nproc=2)


def test_a_job_step_holds_its_pool_nodes_times_gpus_only_on_a_cluster(params):
    step = Step("stage:stage1", "stage", "stage1")
    assert StageStep().destination(_ctx(params), step) == (None, 2)  # local: this machine's processes
    on_cluster = _ctx(params, launcher="kubernetes")
    assert StageStep().destination(on_cluster, step) == ("h100", 4 * 8)  # params: cluster {pool: h100, nodes: 4}
    lam = Step("latent-action", "latent-action", "latent-action")
    assert LatentActionStep().destination(on_cluster, lam) == (None, 2)  # no pool in params, no MOTUS_POOL
    assert LatentActionStep().destination(_ctx(params, launcher="kubernetes", pool="a100"), lam) == ("a100", 8)


def test_plan_totals_per_pool_with_the_price_of_its_device(params):
    rows = [PlanRow("stage:stage1", "stage", "run", [], None, 10.0, "h100"),
            PlanRow("stage:stage2", "stage", "run", [], None, 4.0, "a100"),
            PlanRow("stage:stage3", "stage", "run", [], None, 2.0, "h100"),
            PlanRow("latent-action", "latent-action", "run", [], None, 0.5, None),
            PlanRow("gate:stage1", "gate", "check", [], None),
            PlanRow("tier:x", "tier", "cached", [], "k", 99.0, "h100")]  # cached: costs nothing
    totals = plan_totals(rows, params)
    prices = params.costs.device_hour
    assert totals["h100"] == pytest.approx({"device_hours": 12.0, "cost": 12.0 * prices["H100"]})
    assert totals["a100"] == pytest.approx({"device_hours": 4.0, "cost": 4.0 * prices["A100"]})
    assert totals["this machine"] == {"device_hours": 0.5, "cost": None}  # unknown device: no price, never 0
    out = io.StringIO()
    print_plan(rows, Console(file=out, width=140), params=params)
    text = out.getvalue()
    assert "~10.0000 device h on h100" in text
    assert f"h100: ~12.0000 device h, {12.0 * prices['H100']:.2f} USD" in text
    assert "this machine: ~0.5000 device h, cost unknown" in text
