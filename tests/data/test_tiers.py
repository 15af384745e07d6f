"""Tier storage, validation/quarantine and DVC versioning (local remote and a local S3 server)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from motus.config import validate_params
from motus.data.episode import Episode
from motus.data.ingest import IngestError, ingest_tier
from motus.data.tier import Tier, TierSpec, TierWriter

REPO = Path(__file__).resolve().parents[2]
MOTUS = Path(sys.executable).parent / "motus"


def episode(i: int, t: int = 12, d: int = 14, views=("top",), size=(16, 16), **kw) -> Episode:
    rng = np.random.default_rng(i)
    frames = {v: rng.integers(0, 255, (t, *size, 3), dtype=np.uint8) for v in views}
    defaults = dict(actions=rng.normal(size=(t, d)).astype(np.float32), state=rng.normal(size=(t, d)).astype(np.float32),
                    instructions=["pick up the cube"], fps=10.0, embodiment="aloha", source="test")
    defaults.update(kw)
    return Episode(f"ep{i:04d}", frames, **defaults)


# --------------------------------------------------------------------------------------------- storage

def test_tier_roundtrip_manifest_and_determinism(tmp_path):
    eps = [episode(i) for i in range(5)]
    spec = TierSpec("t", level=6, embodiment="aloha", action_dim=14, codec="npz", shard_bytes=8_000)
    w = TierWriter(tmp_path / "t", spec)
    for e in eps:
        w.add(e)
    m = w.close()
    assert len(m.shards) > 1  # the size target splits shards
    assert m.episodes == 5 and m.frames == 60 and m.action_dim == 14 and m.state_dim == 14
    allact = np.concatenate([e.actions for e in eps])
    np.testing.assert_allclose(m.action_stats["mean"], allact.mean(0), atol=1e-5)
    np.testing.assert_allclose(m.action_stats["std"], allact.std(0), atol=1e-5)
    t = Tier(tmp_path / "t")
    for e in eps:
        back = t.read_episode(e.episode_id)
        assert np.array_equal(back.frames["top"], e.frames["top"])
        assert np.array_equal(back.actions, e.actions) and np.array_equal(back.state, e.state)
        assert back.instructions == e.instructions and back.fps == 10.0
    assert t.verify() == []
    # same episodes -> byte-identical shards -> same content hash
    w2 = TierWriter(tmp_path / "t2", spec)
    for e in eps:
        w2.add(e)
    assert w2.close().content_hash == m.content_hash
    # tampering is detected
    shard = tmp_path / "t" / m.shards[0]["name"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert "sha256 differs" in Tier(tmp_path / "t").verify()[0]


def test_the_index_reads_the_same_without_pyarrow(tmp_path, monkeypatch):
    """A bare GPU node's bundle has no pyarrow: the standard-library reader must give the loader the same columns,
    and name the file and line of a broken record."""
    eps = [episode(i, t=8 + i, instructions=[f"task {i}"] if i % 2 else []) for i in range(4)]
    spec = TierSpec("t", level=6, embodiment="aloha", action_dim=14, codec="npz", shard_bytes=8_000)
    w = TierWriter(tmp_path / "t", spec)
    for e in eps:
        w.add(e)
    w.close()
    arrow = Tier(tmp_path / "t")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    plain = Tier(tmp_path / "t")
    assert plain.ids() == arrow.ids() == [e.episode_id for e in eps]
    assert plain.frame_counts().tolist() == arrow.frame_counts().tolist() == [8, 9, 10, 11]
    assert plain.table.shards.tolist() == arrow.table.shards.tolist() and max(plain.table.shards) > 0
    for e in eps:
        assert plain.instructions(e.episode_id) == arrow.instructions(e.episode_id) == e.instructions
        assert np.array_equal(plain.read_episode(e.episode_id).actions, e.actions)
    index = tmp_path / "t" / "episodes.jsonl"
    index.write_text(index.read_text() + '{"id": "ep9999", "shard": "x"}\n')
    with pytest.raises(Exception, match=r"episodes.jsonl:5: unreadable episode index"):
        Tier(tmp_path / "t").ids()


def test_views_keep_the_sources_camera_order_and_a_window_decodes_only_its_own(tmp_path):
    """A window's default view is the source's first camera, not the alphabetically first name (a tier with a
    head camera and wrist cameras must not train on a wrist by default), and reading it decodes no other view."""
    from motus.data.loader import TierWindows, WindowSpec

    views = ("top", "left_wrist", "right_wrist")
    spec = TierSpec("t", level=4, embodiment="aloha", action_dim=14, codec="npz")
    w = TierWriter(tmp_path / "t", spec)
    for i in range(2):
        w.add(episode(i, views=views))
    assert list(w.close().views) == list(views)
    tier = Tier(tmp_path / "t")
    assert list(tier.manifest.views) == list(views)  # read back from JSON written with sorted keys
    assert list(tier.read_episode("ep0000").frames) == list(views)
    assert list(tier.read_episode("ep0000", prefer="right_wrist").frames) == ["right_wrist"]
    assert list(tier.read_episode("ep0000", prefer="wrist").frames) == ["top"]  # absent: its first view only
    ds = TierWindows(tier, WindowSpec(chunk=4, video_action_ratio=2, downsample=1, image_size=(16, 16)), split="all")
    assert ds.view == "top"
    decoded = []
    real = tier.read_episode
    tier.read_episode = lambda *a, **k: decoded.append(real(*a, **k)) or decoded[-1]
    ds[0]
    assert [list(e.frames) for e in decoded] == [["top"]]


def test_mp4_codec_tier(tmp_path):
    e = episode(1, t=8, size=(32, 32), frames=None) if False else episode(1, t=8, size=(32, 32))
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, None, :, None], (8, 32, 1, 3))
    e.frames = {"top": smooth}
    w = TierWriter(tmp_path / "v", TierSpec("v", 3, "aloha", 14, codec="mp4"))
    w.add(e)
    w.close()
    back = Tier(tmp_path / "v").read_episode(e.episode_id)
    assert back.frames["top"].shape == smooth.shape
    assert np.abs(back.frames["top"].astype(int) - smooth).mean() < 4


# ------------------------------------------------------------------------------------- quarantine

SOURCE = '''
import numpy as np
from motus.data.episode import Episode
from motus.data.sources import SourceError

def ep(i, t=12, d=14, **kw):
    rng = np.random.default_rng(i)
    base = dict(episode_id=f"ep{i:04d}", frames={"top": rng.integers(0, 255, (t, 16, 16, 3), dtype=np.uint8)},
                actions=rng.uniform(0.1, 0.9, (t, d)).astype(np.float32),  # inside every ALOHA joint's range
                state=rng.uniform(0.1, 0.9, (t, 14)).astype(np.float32),
                instructions=["pick up the cube"], fps=10.0, embodiment="aloha", source="fixture")
    base.update(kw)
    return Episode(**base)

def episodes(n_good=4, bad=True):
    for i in range(n_good):
        yield ep(i)
    if not bad:
        return
    nan = ep(100); nan.actions[3, 2] = np.nan; yield nan
    inf = ep(101); inf.state[0, 0] = np.inf; yield inf
    yield ep(102, d=7)                                                   # wrong action width
    short = ep(103); short.actions = short.actions[:-2]; yield short    # lengths disagree
    yield ep(104, frames={"top": np.zeros((12, 16, 16, 3), np.float32)})  # not uint8
    yield ep(105, frames={"top": np.zeros((12, 16, 16), np.uint8)})     # no channel axis
    yield ep(106, frames={"a": np.zeros((12, 8, 8, 3), np.uint8), "b": np.zeros((10, 8, 8, 3), np.uint8)})
    yield ep(107, frames={})                                            # no frames at all
    yield ep(108, t=1)                                                  # one frame
    yield ep(109, episode_id="bad.id")                                  # breaks shard naming
    yield ep(110, instructions=[" "])                                   # tier requires an instruction
    yield ep(111, fps=0.0)
    yield ep(112, actions=np.full((12, 14), 50.0, np.float32))          # outside action bounds
    yield ep(0)                                                         # duplicate id
    yield ep(113, actions=None)                                         # unlabelled in a labelled tier
    deg = ep(115); deg.state[:, 1] = 60.0; yield deg                    # shoulder in degrees, not radians
    yield ep(116, d=13)                                                 # an ALOHA row that lost a joint
    yield SourceError("ep0114", "videos/ep0114.mp4", "undecodable video: moov atom not found")
'''


def write_source(tmp_path: Path) -> Path:
    f = tmp_path / "fixture_source.py"
    f.write_text(textwrap.dedent(SOURCE))
    return f


def tier_cfg(source_file: Path, **options):
    data = {"tiers": {"robot": {"level": 6, "embodiment": "aloha", "action_dim": 14, "source": {
        "kind": "python", "options": {"file": str(source_file), "function": "episodes", "codec": "npz",
                                      "require_instruction": True, "action_bounds": [-10, 10], **options}}}}}
    return validate_params(data).tiers["robot"]


def test_malformed_episodes_are_quarantined_and_every_good_one_survives(tmp_path):
    m = ingest_tier("robot", tier_cfg(write_source(tmp_path)), tmp_path / "robot")
    t = Tier(tmp_path / "robot")
    # ep0000 was stored, then claimed again: neither claimant can be trusted, both are quarantined
    assert sorted(r["id"] for r in t.index) == [f"ep{i:04d}" for i in range(1, 4)]
    records = t.quarantined()
    q = {r["episode"]: " ".join(r["reasons"]) for r in records}
    expected = {
        "ep0100": "actions.non_finite: actions contain NaN/inf", "ep0101": "state.non_finite: state contain NaN/inf",
        "ep0102": "actions.width: actions are 7-d, a 'aloha' robot has 14-d",
        "ep0103": "actions have 10 steps but frames have 12", "ep0104": "dtype float32, expected uint8",
        "ep0105": "expected [T, H, W, 3]", "ep0106": "views disagree on length", "ep0107": "no camera frames",
        "ep0108": "1 frames, need at least 2", "bad.id": "must match", "ep0110": "requires one",
        "ep0111": "fps 0.0", "ep0112": "actions.out_of_bounds: actions outside bounds [-10, 10]",
        "ep0000": "episode.duplicate_id: episode id 'ep0000' is claimed by 2 source episodes",
        "ep0113": "actions.missing", "ep0114": "source.unreadable: undecodable video",
        "ep0115": "state.out_of_bounds: state dim 1 = 60 at step 0, physical range [-1.9, 1.307]",
        "ep0116": "actions.width: actions are 13-d, a 'aloha' robot has 14-d",
    }
    assert len(expected) >= 10
    for eid, reason in expected.items():
        assert reason in q.get(eid, ""), (eid, q.get(eid))
    assert [r["episode"] for r in records].count("ep0000") == 2  # both claimants
    assert m.quarantined == len(expected) + 1
    assert m.source_episodes == m.episodes + m.quarantined == 3 + len(expected) + 1
    assert all(len(reason) <= 200 and reason.isprintable() for r in records for reason in r["reasons"])
    log = (tmp_path / "robot" / "ingest.log").read_text().splitlines()
    assert len(log) == sum(len(r["reasons"]) for r in records)
    assert all(line.split("\t")[1] == "instruction.missing" or line.split("\t")[0] in q for line in log)
    # the shard no longer holds the withdrawn claimant, and the manifest counts only what the tier holds
    assert not Tier(tmp_path / "robot").verify()
    assert m.frames == sum(r["frames"] for r in t.index) and m.embodiments["aloha"]["episodes"] == 3
    import tarfile
    with tarfile.open(tmp_path / "robot" / m.shards[0]["name"]) as tar:
        assert not [n for n in tar.getnames() if n.startswith("ep0000.")]


def test_ingest_fails_only_when_nothing_valid_and_keeps_the_old_tier(tmp_path):
    src = write_source(tmp_path)
    ingest_tier("robot", tier_cfg(src), tmp_path / "robot")
    before = (tmp_path / "robot" / "manifest.json").read_text()
    with pytest.raises(IngestError, match="no valid episodes"):
        ingest_tier("robot", tier_cfg(src, n_good=0, bad=False), tmp_path / "robot")
    assert (tmp_path / "robot" / "manifest.json").read_text() == before  # good data never lost
    with pytest.raises(IngestError, match=r"physical_bounds must be .*entry 0 is \[1\], not \[lo, hi\]"):
        ingest_tier("robot", tier_cfg(src, physical_bounds=[[1]]), tmp_path / "robot")
    with pytest.raises(IngestError, match="missing.py: python source file not found"):
        ingest_tier("robot", tier_cfg(tmp_path / "missing.py"), tmp_path / "robot")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".robot.tmp")]  # no debris


def test_narrow_actions_are_padded_only_when_asked(tmp_path):
    f = tmp_path / "narrow.py"
    f.write_text(textwrap.dedent(SOURCE) + "\ndef narrow():\n    yield ep(1, d=4, embodiment='metaworld')\n"
                 "    yield ep(2)\n    yield ep(3, d=13)\n")
    with pytest.raises(IngestError):
        ingest_tier("robot", tier_cfg(f, function="narrow", require_instruction=False) if False else
                    validate_params({"tiers": {"robot": {"level": 5, "embodiment": "mixed", "action_dim": 14, "source": {
                        "kind": "python", "options": {"file": str(f), "function": "narrow", "codec": "npz", "limit": 1}}}}}).tiers["robot"],
                    tmp_path / "r")
    cfg = validate_params({"tiers": {"robot": {"level": 5, "embodiment": "mixed", "action_dim": 14, "source": {
        "kind": "python", "options": {"file": str(f), "function": "narrow", "codec": "npz", "pad_actions": True}}}}}).tiers["robot"]
    m = ingest_tier("robot", cfg, tmp_path / "r")
    t = Tier(tmp_path / "r")
    a, _ = t.read_arrays("ep0001")
    assert a.shape == (12, 14) and np.all(a[:, 4:] == 0)
    assert {r["native_action_dim"] for r in t.index} == {4, 14}
    assert m.episodes == 2
    # the 13-d ALOHA episode is not padded: its robot has 14 joints, so a column is missing, not narrower data
    (reason,) = [q["reasons"] for q in t.quarantined() if q["episode"] == "ep0003"][0]
    assert reason.startswith("actions.width: actions are 13-d, a 'aloha' robot has 14-d")


# ------------------------------------------------------------------------------------------- DVC

def make_project(tmp_path: Path, remote: str, extra_env: dict | None = None) -> tuple[Path, dict]:
    proj = tmp_path / "proj"
    proj.mkdir()
    src = write_source(tmp_path)
    params = {"data": {"codec": "npz", "shard_mb": 64, "root": "data/tiers"}, "tiers": {"robot": {
        "level": 6, "embodiment": "aloha", "action_dim": 14,
        "source": {"kind": "python", "options": {"file": str(src), "function": "episodes", "bad": False}}}}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    # the shipped ingest stage; the feature stages need a stage2 recipe this project does not have
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stages["ingest"]}}))
    # the stage depends on the data code: give the project its own copy of it
    shutil.copytree(REPO / "motus" / "data", proj / "motus" / "data", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    env = dict(os.environ, MOTUS_DATA_REMOTE=remote, **(extra_env or {}))
    env.pop("MOTUS_PARAMS_FILE", None)
    env.pop("MOTUS_PARAMS", None)
    return proj, env


def motus(proj: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(MOTUS), *args], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"motus {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r


def roundtrip(proj: Path, env: dict) -> None:
    out = motus(proj, env, "data", "version").stdout
    assert "robot: dvc " in out and ".dir" in out
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    dvc_hash = lock["stages"]["ingest@robot"]["outs"][0]["md5"]
    manifest = json.loads((proj / "data/tiers/robot/manifest.json").read_text())
    # drop the workspace copy and the cache, pull from the remote, compare
    shutil.rmtree(proj / "data" / "tiers" / "robot")
    shutil.rmtree(proj / ".dvc" / "cache")
    subprocess.run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=proj, env=env, check=True)
    assert json.loads((proj / "data/tiers/robot/manifest.json").read_text()) == manifest
    assert Tier(proj / "data/tiers/robot").verify() == []
    st = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=proj, env=env, capture_output=True,
                        text=True, check=True)
    assert json.loads(st.stdout or "{}") == {}
    # nothing changed -> `version` does not rebuild and the hash stays
    again = motus(proj, env, "data", "version").stdout
    assert dvc_hash in again
    status = json.loads(motus(proj, env, "data", "status", "--json").stdout)
    assert status[0]["built"] and status[0]["dvc_hash"] == dvc_hash and not status[0]["stale"]


@pytest.mark.slow
def test_dvc_roundtrip_local_remote(tmp_path):
    proj, env = make_project(tmp_path, str(tmp_path / "remote"))
    roundtrip(proj, env)
    assert any((tmp_path / "remote").rglob("*"))


@pytest.mark.slow
def test_dvc_roundtrip_with_a_hardlinked_cache(tmp_path):
    """MOTUS_DVC_CACHE_TYPE=hardlink: the tier is hashed and linked into DVC's cache, never copied there."""
    from pydantic import ValidationError

    from motus.config import Settings

    with pytest.raises(ValidationError, match="dvc_cache_type"):
        Settings(dvc_cache_type="links")
    proj, env = make_project(tmp_path, str(tmp_path / "remote"), {"MOTUS_DVC_CACHE_TYPE": "hardlink"})
    roundtrip(proj, env)
    assert "type = hardlink" in (proj / ".dvc" / "config.local").read_text()
    # each file with bytes is one inode with its cache entry (DVC writes empty files, it does not link them)
    files = [f for f in (proj / "data/tiers/robot").rglob("*") if f.is_file() and f.stat().st_size]
    assert len(files) >= 3 and all(f.stat().st_nlink == 2 for f in files), [(f.name, f.stat().st_nlink) for f in files]


@pytest.mark.slow
def test_dvc_roundtrip_local_s3_server(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="tiers")
        proj, env = make_project(tmp_path, "s3://tiers/dvc", {**creds, "MOTUS_S3_ENDPOINT_URL": endpoint})
        roundtrip(proj, env)
        keys = s3.list_objects_v2(Bucket="tiers").get("KeyCount", 0)
        assert keys > 0
        up = json.loads(motus(proj, env, "data", "status", "--cloud", "--json").stdout)
        assert up[0]["pushed"]
    finally:
        server.stop()
    # the object store down: said so, non-zero, never "NOT pushed" for every tier
    r = subprocess.run([str(MOTUS), "data", "status", "--cloud"], cwd=proj, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and r.stderr.startswith("error: remote unreachable: the DVC remote s3://tiers/dvc")
    assert "NOT pushed" not in r.stdout
