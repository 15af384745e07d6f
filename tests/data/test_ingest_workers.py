"""`ingest --workers N`: the episodes' checks and encoding run in worker processes, the tier is the same bytes."""

import hashlib
import textwrap
from pathlib import Path

import pytest

from motus.config import validate_params
from motus.data import ingest as ingest_mod
from motus.data.ingest import IngestError, ingest_tier

from .test_tiers import SOURCE, tier_cfg

# The fixture's malformed episodes, spread through a longer run of good ones so they land in different
# worker batches, plus what only the order of the episodes decides: a duplicate id whose first claimant was
# stored two batches earlier, an id claimed three times, an episode whose state width disagrees with the
# episodes before it, a first-of-its-embodiment width, and kept episodes without an instruction.
MIXED = SOURCE + '''

def mixed(n=150):
    bad = list(episodes(n_good=0))
    for i in range(n):
        yield ep(200 + i, instructions=[] if i % 37 == 5 else ["pick up the cube"])
        if i % 9 == 4 and bad:
            yield bad.pop(0)
        if i == n - 10:
            yield ep(203)                     # claims an id stored batches ago
            yield ep(210); yield ep(210)      # three claimants of one id
            yield ep(900, state=np.zeros((12, 9), np.float32))  # state width
            yield ep(901, d=6, embodiment="toy"); yield ep(902, d=5, embodiment="toy")  # first toy width wins
    yield from bad

def broken(n=100):
    yield from mixed(n)
    from motus.data.sources import SourceUnreadable
    raise SourceUnreadable("videos/", "the disk went away")
'''


def tier_files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def ingest_with(tmp_path: Path, cfg, workers: int, name: str):
    calls: list[tuple[int, int]] = []
    m = ingest_tier("robot", cfg, tmp_path / name, progress=lambda good, bad: calls.append((good, bad)),
                    workers=workers)
    return m, calls


@pytest.mark.parametrize("codec", ["npz", "mp4"])
def test_workers_write_the_same_tier_as_one_process(tmp_path, monkeypatch, codec):
    src = tmp_path / "mixed_source.py"
    src.write_text(textwrap.dedent(MIXED))
    n = 150 if codec == "npz" else 24
    cfg = tier_cfg(src, function="mixed", n=n, codec=codec, require_instruction=False, shard_mb=0.05)
    one, one_calls = ingest_with(tmp_path, cfg, 1, "one")
    # small batches: many of them in flight, so the order really is restored from out-of-order workers
    monkeypatch.setattr(ingest_mod, "BATCH_EPISODES", 7)
    two, two_calls = ingest_with(tmp_path, cfg, 2, "two")

    assert two.content_hash == one.content_hash
    assert tier_files(tmp_path / "two") == tier_files(tmp_path / "one")  # shards, index, manifest, quarantine, log
    assert (tmp_path / "two" / "ingest.log").read_text() == (tmp_path / "one" / "ingest.log").read_text()
    assert two_calls == one_calls and len(one_calls) == one.source_episodes
    assert one.quarantined >= 15 and len(one.shards) > 1
    quarantine = (tmp_path / "one" / "quarantine.jsonl").read_text()
    log = (tmp_path / "one" / "ingest.log").read_text()
    assert quarantine.count('"episode": "ep0203"') == 2 and quarantine.count('"episode": "ep0210"') == 3
    if codec == "npz":
        assert "state.width" in quarantine and "actions are 5-d, the first 'toy' episode has 6-d" in quarantine
        assert "instruction.missing" in log and one.without_instruction > 0


def test_a_source_error_midway_fails_the_same_after_the_same_episodes(tmp_path):
    src = tmp_path / "mixed_source.py"
    src.write_text(textwrap.dedent(MIXED))
    cfg = tier_cfg(src, function="broken", n=100, require_instruction=False)
    seen = {}
    for workers in (1, 2):
        calls: list[tuple[int, int]] = []
        with pytest.raises(IngestError, match="source unreadable: .*the disk went away"):
            ingest_tier("robot", cfg, tmp_path / "r", progress=lambda g, b, c=calls: c.append((g, b)), workers=workers)
        seen[workers] = calls
    assert seen[1] == seen[2] and len(seen[1]) > 100
    assert not (tmp_path / "r").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".r.tmp")]


def test_workers_must_be_positive(tmp_path):
    cfg = validate_params({"tiers": {"t": {"level": 4, "embodiment": "aloha", "action_dim": 14, "source": {
        "kind": "python", "options": {"function": "nowhere:episodes"}}}}}).tiers["t"]
    with pytest.raises(IngestError, match="workers must be >= 1"):
        ingest_tier("t", cfg, tmp_path / "t", workers=0)
