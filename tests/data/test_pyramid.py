"""The embedded default pyramid of params.yaml, every level built from real simulator episodes (shrunk)."""

import copy
from pathlib import Path

import numpy as np
import pytest

from motus.config import load_params
from motus.data.ingest import ingest_tier
from motus.data.loader import TierWindows, WindowSpec
from motus.data.tier import Tier

REPO = Path(__file__).resolve().parents[2]


def shrink(options: dict) -> dict:
    """Same sources, one episode each: the test checks wiring, not volume."""
    out = copy.deepcopy(options)
    for key in ("n", "episodes_per_task"):
        if key in out:
            out[key] = 1
    if "tasks" in out:
        out["tasks"] = out["tasks"][:1]
    if "parts" in out:
        out["parts"] = [dict(p, options=shrink(p.get("options", {}))) for p in out["parts"]]
    return out


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    params = load_params(REPO / "params.yaml")
    root = tmp_path_factory.mktemp("tiers")
    built = {}
    for name, tier in params.tiers.items():
        tier = tier.model_copy(deep=True)
        tier.source.options = shrink(tier.source.options) | {"codec": "mp4"}
        built[name] = ingest_tier(name, tier, root / name)
    return params, root, built


@pytest.mark.slow
def test_every_level_is_built_from_simulator_episodes(pyramid):
    params, root, built = pyramid
    assert sorted({m.level for m in built.values()}) == [2, 3, 4, 5, 6]
    for name, m in built.items():
        cfg = params.tiers[name]
        assert m.level == cfg.level and m.action_dim == cfg.action_dim and m.episodes >= 1
        assert m.quarantined == 0, Tier(root / name).quarantined()
        t = Tier(root / name)
        ep = t.read_episode(t.index[0]["id"])
        assert ep.problems(action_dim=cfg.action_dim) == []
        assert ep.frames[next(iter(ep.frames))].shape[1:] == (64, 64, 3)
        if cfg.action_dim is None:
            assert ep.actions is None and m.action_stats is None
        else:
            assert ep.actions.shape[1] == cfg.action_dim and np.isfinite(ep.actions).all()
    # level 5 mixes two embodiments; Sawyer's 4-d actions are padded into the 14-d space
    emb = built["multi-robot"].embodiments
    assert set(emb) == {"sawyer", "aloha"} and emb["sawyer"]["action_dim"] == 4 and emb["aloha"]["action_dim"] == 14
    # level 6 demonstrations come from a policy that actually succeeds
    t = Tier(root / "target-aloha-transfer")
    assert t.read_episode(t.index[0]["id"]).extra["success"] is True


@pytest.mark.slow
def test_windows_from_a_built_tier_have_the_model_shapes(pyramid):
    from motus.model import build_config

    _, root, _ = pyramid
    cfg = build_config("tiny")
    ratio = cfg.action.chunk // (cfg.num_frames - 1)
    ds = TierWindows(Tier(root / "target-aloha-transfer"),
                     WindowSpec(chunk=cfg.action.chunk, video_action_ratio=ratio, downsample=3,
                                image_size=(cfg.height, cfg.width)), split="all")
    item = ds[0]
    assert item["video"].shape == (3, cfg.num_frames, cfg.height, cfg.width)
    assert item["actions"].shape == (cfg.action.chunk, cfg.action.action_dim)
    assert item["state"].shape == (cfg.action.state_dim,)
    assert item["instruction"].startswith("transfer the cube")
