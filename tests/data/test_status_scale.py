"""`motus data status` at scale: no index parsed, no heavy import, DVC's answer kept while nothing it read changed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from motus.data import versioning as v
from motus.data.tier import TierSpec, TierWriter

from .test_tiers import episode

DVC_YAML = """
stages:
  ingest:
    foreach: ${tiers}
    do:
      cmd: motus data ingest ${key}
      params:
        - tiers.${key}
      deps:
        - source.py
      outs:
        - data/tiers/${key}
"""


@pytest.fixture
def project(tmp_path) -> Path:
    """A DVC project whose one tier is built and committed to dvc.lock (as `motus data version` leaves it)."""
    (tmp_path / "source.py").write_text("# the tier's reader\n")
    (tmp_path / "params.yaml").write_text(json.dumps({"data": {"root": "data/tiers", "codec": "npz"}, "tiers": {
        "t": {"level": 4, "embodiment": "aloha", "action_dim": 14, "source": {
            "kind": "python", "options": {"file": str(tmp_path / "source.py"), "function": "episodes"}}}}}))
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    w = TierWriter(tmp_path / "data" / "tiers" / "t", TierSpec("t", 4, "aloha", 14, codec="npz"))
    for i in range(3):
        w.add(episode(i))
    w.close()
    for args in (["init", "--no-scm", "-q"], ["commit", "-f", "-q", "ingest@t"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return tmp_path


def test_dvc_status_is_asked_again_only_when_a_file_it_reads_changed(project, monkeypatch):
    assert v.stale_ingest_stages(project) == set()
    assert (project / v.STATUS_CACHE).is_file()
    asked = []
    real = v.stale_tiers
    monkeypatch.setattr(v, "stale_tiers", lambda root, cloud=False: asked.append(root) or real(root, cloud))
    assert v.stale_ingest_stages(project) == set() and not asked  # nothing changed: DVC is not started

    (project / "source.py").write_text("# the tier's reader, edited\n")  # a dep of the stage
    assert v.stale_ingest_stages(project) == {"ingest@t"} and len(asked) == 1
    assert v.stale_ingest_stages(project) == {"ingest@t"} and len(asked) == 1  # kept: still stale, not re-asked
    (project / "data" / "tiers" / "t" / "extra.txt").write_text("x")  # a new file in the tier (an out)
    assert v.stale_ingest_stages(project) == {"ingest@t"} and len(asked) == 2
    (project / "source.py").write_text("# the tier's reader\n")
    (project / "data" / "tiers" / "t" / "extra.txt").unlink()
    assert v.stale_ingest_stages(project) == set() and len(asked) == 3

    (project / v.STATUS_CACHE).write_text("{not json")  # a damaged cache is asked again, then rewritten
    assert v.stale_ingest_stages(project) == set() and len(asked) == 4
    assert json.loads((project / v.STATUS_CACHE).read_text())["changed"] == []


def test_no_dvc_yaml_means_no_ingest_stage_and_no_dvc_call(tmp_path, monkeypatch):
    monkeypatch.setattr(v, "stale_tiers", lambda *a, **k: pytest.fail("dvc status was started"))
    assert v.stale_ingest_stages(tmp_path) == set()


def test_status_reads_manifests_only_and_imports_nothing_heavy(project):
    script = textwrap.dedent("""
        import json, sys
        sys.argv = ["motus", "data", "status", "--json"]
        from motus.cli import app
        try:
            app()
        except SystemExit as e:
            assert not e.code, e.code
        heavy = ("numpy", "av", "torch", "mlflow", "dvc", "pyarrow", "motus.data.tier")
        print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
    """)
    (project / "data" / "tiers" / "t" / "episodes.jsonl").write_text("not json: status must not parse it\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=project, check=True, capture_output=True, text=True,
                         env={**os.environ, "MOTUS_PARAMS_FILE": str(project / "params.yaml")}).stdout
    rows, imported = out.rsplit("\n", 2)[0], json.loads(out.rsplit("\n", 2)[1])
    (row,) = json.loads(rows)
    # built from the manifest alone, and stale: the index it never parsed is no longer what dvc.lock holds
    assert row["built"] and row["episodes"] == 3 and row["dvc_hash"].endswith(".dir") and row["stale"] is True
    assert imported == []
