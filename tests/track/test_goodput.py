"""Goodput: the share of a job's device time that trained the model (each step counted once)."""

import pytest

from motus.track.accounting import goodput


def test_steps_run_again_after_a_restart_are_lost_once_counted_once():
    # steps 1-4, a restart from the checkpoint at step 2, steps 3-5 again: steps 3 and 4 ran twice
    steps = [1, 2, 3, 4, 3, 4, 5]
    metrics = [{"step": s, "perf/step_time_s": 36.0} for s in steps] + [{"step": 5, "val/loss": 1.0}]
    g = goodput(metrics, total_device_hours=0.5, devices=4)
    assert g["productive_device_hours"] == pytest.approx(5 * 36.0 * 4 / 3600)  # 0.2
    assert g["redone_device_hours"] == pytest.approx(2 * 36.0 * 4 / 3600) and g["redone_steps"] == 2
    assert g["lost_device_hours"] == pytest.approx(0.3) and g["goodput"] == pytest.approx(0.4)


def test_an_uninterrupted_job_loses_only_its_overheads():
    g = goodput([{"step": s, "perf/step_time_s": 1.0} for s in range(1, 4)], total_device_hours=6 / 3600, devices=1)
    assert g["redone_steps"] == 0 and g["goodput"] == pytest.approx(0.5)
    # a clock that says less than the steps took cannot make goodput exceed 1
    assert goodput([{"step": 1, "perf/step_time_s": 10.0}], total_device_hours=0.0, devices=1)["goodput"] == 1.0
