"""The `motus` console script as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "motus"


def run(*args, cwd=None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("config", "model", "demo"):
        assert cmd in r.stdout


def test_model_info_full_preset_prints_official_counts():
    r = run("model", "info", "--preset", "full")
    assert r.returncode == 0, r.stderr
    counts = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines() if ln.strip().endswith(("M", "(frozen)"))}
    assert counts["action"] == "641.5"
    assert counts["understanding"] == "253.5"
    assert counts["video"] == "4999.8"
    assert counts["vlm"] == "2127.5"


def test_model_info_rejects_unknown_preset():
    r = run("model", "info", "--preset", "huge")
    assert r.returncode != 0
    assert "unknown model preset 'huge'" in r.stderr


@pytest.mark.slow
def test_demo_trains_and_samples_every_mode(tmp_path):
    r = run("demo", "--seconds", "2", "--out", str(tmp_path / "model"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for mode in ("vla", "wm", "idm", "vgm", "joint"):
        assert f"  {mode}" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("trained "))
    first, last = (float(x) for x in line.split("loss ")[1].split(" -> "))
    assert last < first
    assert (tmp_path / "model" / "model.safetensors").exists()
