"""Registration killed for real (SIGKILL) in each gap between its writes, then run again: one version of the
export, fetchable and matching its hash, `candidate` on it and audited once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from motus.config import load_params
from motus.track.registry import Registry
from motus.track.registry.crashpoints import ENV, POINTS

REGISTER = """
import sys
from motus.config import load_params
from motus.track.registry import Registry
Registry(sys.argv[1], load_params(sys.argv[2]), lock_ttl=1.0).register(sys.argv[3])
print("registered")
"""


@pytest.mark.parametrize("point", POINTS)
def test_registration_killed_in_each_gap_completes_on_rerun_with_one_fetchable_version(chains, tmp_path, point):
    chain = chains["sqlite"]
    uri = chain.fresh_uri(tmp_path / "store")
    params_file = str(chain.proj / "params.yaml")
    export = chain.runs["s1"] / "export"
    env = {**os.environ, ENV: point}
    killed = subprocess.run([sys.executable, "-c", REGISTER, uri, params_file, str(export)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and "registered" not in killed.stdout, (killed.returncode, killed.stderr[-2000:])

    # the killed process held the model's lock: a short heartbeat TTL lets the rerun break it in seconds
    reg = Registry(uri, load_params(params_file), lock_ttl=1.0)
    name = "motus-vgm"
    before = reg.versions(name)
    ref = reg.register(export)
    again = reg.register(export)
    versions = reg.versions(name)
    assert again.version == ref.version and len(versions) == 1, [v.version for v in versions]
    assert len(before) == (1 if point == "registry.created" else 0)  # the gap really was between those writes
    fetched = reg.fetch(ref, tmp_path / "fetched")
    assert (fetched / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    assert reg.aliases(name)["candidate"] == ref.version
    registers = [e for e in reg.history(name) if e["action"] == "register" and e["to"] == ref.version]
    assert len(registers) == 1
    assert [problem for _, problem in reg.verify(name) if problem] == []
