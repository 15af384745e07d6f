"""Window loader: exact window indices, normalisation, episode split, weighted deterministic mixing, resume."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from motus.data.episode import Episode
from motus.data.loader import (
    MixedWindows,
    TierWindows,
    WindowSpec,
    collate_windows,
    denormalize_actions,
    split_episodes,
)
from motus.data.tier import Tier, TierSpec, TierWriter

T, HW, D, S = 40, 16, 3, 2


def _episode(e: int, frames: int = T, labelled: bool = True, shift: float = 0.0) -> Episode:
    t = np.arange(frames)
    head = np.zeros((frames, HW, HW, 3), np.uint8)
    head[..., 0] = (t * 5)[:, None, None]  # red = 5 * frame index
    head[..., 1] = 10 * e  # green = 10 * episode number
    wrist = np.full((frames, HW, HW, 3), 200, np.uint8)
    # action j at frame t = t + 100 j + 1000 e: the value names the frame it came from
    actions = (t[:, None] + 100 * np.arange(D)[None] + 1000 * e + shift).astype(np.float32) if labelled else None
    state = np.stack([t, -t], 1).astype(np.float32)
    return Episode(episode_id=f"ep{e:02d}", frames={"head": head, "wrist": wrist}, actions=actions, state=state,
                   instructions=[f"task {e}"] if e % 2 == 0 else [], fps=10.0, embodiment="toy", source="test")


def _build(path, name: str, episodes: list[Episode], action_dim: int | None = D) -> Tier:
    names = tuple(f"joint{i}" for i in range(action_dim)) if action_dim else None
    w = TierWriter(path, TierSpec(name=name, level=6, embodiment="toy", action_dim=action_dim, codec="npz",
                                  action_names=names))
    for ep in episodes:
        w.add(ep)
    w.close()
    return Tier(path)


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    labelled = _build(root / "robot", "robot", [_episode(e) for e in range(6)] + [_episode(9, frames=10)])
    unlabelled = _build(root / "human", "human", [_episode(e, labelled=False) for e in range(4)], action_dim=None)
    changed = _build(root / "robot2", "robot", [_episode(e, shift=0.5) for e in range(6)])
    return {"robot": labelled, "human": unlabelled, "robot_changed": changed}


SPEC = WindowSpec(chunk=8, video_action_ratio=4, downsample=2, image_size=(HW, HW), normalization="none")


def _key(item):
    return item["tier"], item["episode_id"], item["start"]


# ------------------------------------------------------------------------------------------------ windows


def test_window_shapes_and_exact_indices(tiers):
    ds = TierWindows(tiers["robot"], SPEC, split="all")
    # span = d*K + 1 = 17 frames -> starts 0..23 -> 24 windows per 40-frame episode; the 10-frame one is skipped
    assert len(ds) == 6 * 24 and ds.skipped_short == 1 and ds.skipped_short_ids == ["ep09"]
    assert ds.view == "head"  # first view in the manifest
    seen = set()
    for idx in range(len(ds)):
        item = ds[idx]
        e, s = int(item["episode_id"][2:]), item["start"]
        seen.add((e, s))
        assert item["video"].shape == (3, 1 + 8 // 4, HW, HW) and item["video"].dtype == torch.float32
        assert item["actions"].shape == (8, D) and item["state"].shape == (S,)
        red = (item["video"][0, :, 0, 0] + 1) * 127.5
        torch.testing.assert_close(red, torch.tensor([5.0 * (s + 2 * 4 * j) for j in range(3)]))
        green = (item["video"][1, :, 0, 0] + 1) * 127.5
        torch.testing.assert_close(green, torch.full((3,), 10.0 * e))
        expect = torch.tensor([[s + 2 * i + 100 * j + 1000 * e for j in range(D)] for i in range(8)],
                              dtype=torch.float32)
        torch.testing.assert_close(item["actions"], expect)
        torch.testing.assert_close(item["state"], torch.tensor([s, -s], dtype=torch.float32))
        assert item["instruction"] == (f"task {e}" if e % 2 == 0 else "")
        assert item["tier"] == "robot"
        assert s + 2 * 8 <= T - 1  # the last video frame s + d*K is inside the episode
    assert seen == {(e, s) for e in range(6) for s in range(24)}
    assert ds.decodes == 6  # consecutive windows share one decode through the LRU cache


def test_stride_view_resize_and_padding(tiers):
    spec = WindowSpec(chunk=4, video_action_ratio=2, downsample=3, image_size=(8, 12), view="wrist",
                      normalization="none", action_dim=5)
    ds = TierWindows(tiers["robot"], spec, split="all", stride=5, cache_size=1)
    # span 13 -> largest start 27 -> starts 0, 5, ..., 25 (6 per episode); the 10-frame episode is too short
    assert len(ds) == 6 * 6 and ds.skipped_short == 1
    assert [ds.locate(i)[1] for i in range(6)] == [0, 5, 10, 15, 20, 25]
    item = ds[7]
    assert item["video"].shape == (3, 3, 8, 12)
    torch.testing.assert_close(item["video"], torch.full((3, 3, 8, 12), 200 / 127.5 - 1))  # constant view
    assert item["actions"].shape == (4, 5)
    assert (item["actions"][:, D:] == 0).all()
    assert item["actions"][:, 0].tolist() == [1005.0, 1008.0, 1011.0, 1014.0]  # ep01, start 5, d=3
    too_narrow = WindowSpec(chunk=4, video_action_ratio=2, downsample=1, image_size=(8, 8), action_dim=2)
    with pytest.raises(ValueError, match="wider than"):
        TierWindows(tiers["robot"], too_narrow)


def test_spec_validation():
    with pytest.raises(ValueError, match="must divide"):
        WindowSpec(chunk=6, video_action_ratio=4, downsample=1, image_size=(8, 8))
    with pytest.raises(ValueError, match="normalization"):
        WindowSpec(chunk=4, video_action_ratio=2, downsample=1, image_size=(8, 8), normalization="zscore")
    assert WindowSpec(chunk=8, video_action_ratio=4, downsample=2, image_size=(8, 8)).num_starts(16) == 0
    assert WindowSpec(chunk=8, video_action_ratio=4, downsample=2, image_size=(8, 8)).num_starts(17) == 1


def test_too_short_episodes_are_counted_and_logged(tiers, caplog):
    spec = WindowSpec(chunk=16, video_action_ratio=4, downsample=2, image_size=(8, 8))  # span 33
    with caplog.at_level(logging.WARNING, logger="motus.data.loader"):
        ds = TierWindows(tiers["robot"], spec, split="all")
    assert ds.skipped_short == 1 and len(ds) == 6 * (40 - 33 + 1)
    assert "skipped 1 episode" in caplog.text
    longer = WindowSpec(chunk=20, video_action_ratio=4, downsample=2, image_size=(8, 8))  # span 41 > 40
    ds = TierWindows(tiers["robot"], longer, split="all")
    assert len(ds) == 0 and ds.skipped_short == 7


# ------------------------------------------------------------------------------------------ normalisation


def test_mean_std_normalisation_uses_manifest_and_round_trips(tiers):
    tier = tiers["robot"]
    raw = TierWindows(tier, SPEC, split="all")
    spec = WindowSpec(chunk=8, video_action_ratio=4, downsample=2, image_size=(HW, HW), normalization="mean_std")
    ds = TierWindows(tier, spec, split="all")
    stats = tier.manifest.action_stats
    norm = ds.normalization
    assert norm["method"] == "mean_std" and norm["actions"] == {"mean": stats["mean"], "std": stats["std"]}
    # the joint names travel from the manifest into the contract every export carries
    assert tier.manifest.action_names == tuple(f"joint{i}" for i in range(D)) == tuple(norm["action_names"])
    assert norm["state"]["mean"] == tier.manifest.state_stats["mean"]
    for idx in (0, 37, len(ds) - 1):
        a, r = ds[idx]["actions"], raw[idx]["actions"]
        expect = (r - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])
        torch.testing.assert_close(a, expect)
        torch.testing.assert_close(ds.denormalize_actions(a), r, atol=1e-3, rtol=1e-5)
        np.testing.assert_allclose(denormalize_actions(a.numpy(), norm), r.numpy(), atol=1e-3, rtol=1e-5)
        st = tier.manifest.state_stats
        torch.testing.assert_close(ds[idx]["state"], (raw[idx]["state"] - torch.tensor(st["mean"]))
                                   / torch.tensor(st["std"]))


def test_min_max_stays_in_range_and_round_trips_inside(tiers):
    tier = tiers["robot"]
    spec = WindowSpec(chunk=8, video_action_ratio=4, downsample=2, image_size=(HW, HW), normalization="min_max",
                      action_dim=D + 1)
    ds, raw = TierWindows(tier, spec, split="all"), TierWindows(tier, SPEC, split="all")
    q01, q99 = (np.array(tier.manifest.action_stats[k]) for k in ("q01", "q99"))
    assert ds.normalization["actions"] == {"q01": list(q01), "q99": list(q99)}
    for idx in range(0, len(ds), 7):
        a = ds[idx]["actions"]
        assert a.shape == (8, D + 1) and a.min() >= -1 and a.max() <= 1 and (a[:, D] == 0).all()
        r = raw[idx]["actions"].numpy()
        inside = ((r >= q01) & (r <= q99)).all(1)
        back = ds.denormalize_actions(a).numpy()
        assert back.shape == (8, D)
        np.testing.assert_allclose(back[inside], r[inside], atol=1e-2)
        expect = np.clip(2 * (r - q01) / (q99 - q01) - 1, -1, 1)
        np.testing.assert_allclose(a[:, :D].numpy(), expect, atol=1e-5)


# ------------------------------------------------------------------------------------------------ split


def test_split_by_episode_is_disjoint_stable_and_nonempty(tiers):
    tier = tiers["robot"]
    train = TierWindows(tier, SPEC, split="train", heldout_fraction=0.3)
    held = TierWindows(tier, SPEC, split="heldout", heldout_fraction=0.3)
    every = TierWindows(tier, SPEC, split="all")
    assert held.episode_ids and train.episode_ids
    assert not set(train.episode_ids) & set(held.episode_ids)
    assert set(train.episode_ids) | set(held.episode_ids) == set(every.episode_ids)
    assert {train[i]["episode_id"] for i in range(len(train))} == set(train.episode_ids)
    assert len(train) + len(held) == len(every)
    # no seed is involved: the same ids again, also from a fresh reader of the same folder
    again = TierWindows(Tier(tier.path), SPEC, split="heldout", heldout_fraction=0.3)
    assert again.episode_ids == held.episode_ids
    torch.manual_seed(123)
    np.random.seed(123)
    assert TierWindows(tier, SPEC, split="heldout", heldout_fraction=0.3).episode_ids == held.episode_ids
    # a tiny fraction still holds out one episode; fraction 0 holds out none
    ids = [f"e{i}" for i in range(5)]
    tr, he = split_episodes("robot", ids, 1e-9)
    assert len(he) == 1 and len(tr) == 4
    assert split_episodes("robot", ids, 0.0) == (ids, [])
    tr, he = split_episodes("robot", ids, 1 - 1e-9)  # ... and a fraction near 1 still keeps one for training
    assert len(tr) == 1 and len(he) == 4
    # the default fraction (0.1) on this 7-episode tier still yields a non-empty held-out split
    assert TierWindows(tier, SPEC, split="heldout").episode_ids


# ------------------------------------------------------------------------------------------------ mixing


def _mix(tiers, seed=0, weights=None, **kw):
    sources = {"robot": TierWindows(tiers["robot"], SPEC, split="all"),
               "human": TierWindows(tiers["human"], SPEC, split="all")}
    return MixedWindows(sources, weights or {"robot": 0.8, "human": 0.2}, seed=seed, **kw)


def test_mixed_stream_is_deterministic_and_follows_weights(tiers):
    a, b, c = _mix(tiers, seed=3), _mix(tiers, seed=3), _mix(tiers, seed=4)
    assert [a.sample_index(i) for i in range(300)] == [b.sample_index(i) for i in range(300)]
    assert [a.sample_index(i) for i in range(300)] != [c.sample_index(i) for i in range(300)]
    for i in (0, 5, 17):
        x, y = a[i], b[i]
        assert _key(x) == _key(y)
        torch.testing.assert_close(x["video"], y["video"])
    it_a, it_b = iter(a), iter(b)
    assert [_key(next(it_a)) for _ in range(10)] == [_key(next(it_b)) for _ in range(10)]
    # 2000 draws at 0.8/0.2: binomial std is 0.009, the tolerance 0.03 is > 3 std
    frac = sum(a.sample_index(i)[0] == "robot" for i in range(2000)) / 2000
    assert abs(frac - 0.8) < 0.03
    # windows within a tier are drawn roughly uniformly: every episode of 'robot' shows up
    eps = {a.sources["robot"].locate(w)[0] for n, w in (a.sample_index(i) for i in range(2000)) if n == "robot"}
    assert eps == set(a.sources["robot"].episode_ids)


def test_mixed_rejects_bad_weights_and_empty_tiers(tiers):
    with pytest.raises(ValueError, match="'human'"):
        _mix(tiers, weights={"robot": 1.0, "human": 0.0})
    with pytest.raises(ValueError, match="'robot'"):
        _mix(tiers, weights={"robot": -1.0, "human": 1.0})
    with pytest.raises(ValueError, match="unknown tier.*'sim'"):
        _mix(tiers, weights={"robot": 1.0, "human": 1.0, "sim": 1.0})
    empty = TierWindows(tiers["robot"], WindowSpec(chunk=20, video_action_ratio=4, downsample=2, image_size=(8, 8)))
    with pytest.raises(ValueError, match="'robot' has zero windows"):
        MixedWindows({"robot": empty}, {"robot": 1.0}, seed=0)


def test_resume_continues_exactly_and_refuses_changed_tiers(tiers):
    original = _mix(tiers, seed=7)
    it = iter(original)
    first = [_key(next(it)) for _ in range(9)]
    state = original.state_dict()
    assert state["position"] == 9 and state["seed"] == 7 and state["weights"] == {"human": 0.2, "robot": 0.8}
    assert state["tiers"] == {"robot": tiers["robot"].content_hash, "human": tiers["human"].content_hash}
    expected = [_key(next(it)) for _ in range(6)]

    resumed = _mix(tiers, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [_key(next(it2)) for _ in range(6)] == expected
    assert resumed.state_dict()["position"] == 15
    assert first == [_key(_mix(tiers, seed=7)[i]) for i in range(9)]

    changed = MixedWindows({"robot": TierWindows(tiers["robot_changed"], SPEC, split="all"),
                            "human": TierWindows(tiers["human"], SPEC, split="all")},
                           {"robot": 0.8, "human": 0.2}, seed=7)
    with pytest.raises(ValueError, match="'robot'.*changed|changed.*'robot'"):
        changed.load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        _mix(tiers, weights={"robot": 0.5, "human": 0.5}).load_state_dict(state)


def test_num_samples_and_dataloader_workers_give_the_same_stream(tiers):
    def stream(workers, batch, block):
        mix = _mix(tiers, seed=11, num_samples=10, worker_block=block)
        collate = functools.partial(collate_windows, allow_missing_actions=True)
        loader = DataLoader(mix, batch_size=batch, num_workers=workers, collate_fn=collate)
        return [k for b in loader for k in zip(b["tier"], b["episode_id"], b["start"].tolist(), strict=True)]

    reference = [_key(_mix(tiers, seed=11)[i]) for i in range(10)]
    assert len(_mix(tiers, seed=11, num_samples=10)) == 10
    assert stream(0, 4, 1) == reference
    assert stream(2, 1, 1) == reference  # default block: round-robin over single positions
    assert stream(2, 4, 4) == reference  # block = batch size: whole consecutive batches per worker


# ------------------------------------------------------------------------------------------------ collate


def test_collate_labelled_unlabelled(tiers):
    robot = TierWindows(tiers["robot"], SPEC, split="all")
    human = TierWindows(tiers["human"], SPEC, split="all")
    assert human[0]["actions"] is None and human.normalization["actions"] is None
    batch = collate_windows([robot[0], robot[30]])
    assert batch["video"].shape == (2, 3, 3, HW, HW) and batch["actions"].shape == (2, 8, D)
    assert batch["state"].shape == (2, S) and batch["start"].tolist() == [0, 6] and "action_mask" not in batch
    assert collate_windows([human[0], human[1]])["actions"] is None
    with pytest.raises(ValueError, match="allow_missing_actions"):
        collate_windows([robot[0], human[0]])
    mixed = collate_windows([robot[0], human[0]], allow_missing_actions=True)
    assert mixed["actions"].shape == (2, 8, D) and mixed["action_mask"].tolist() == [True, False]
    assert (mixed["actions"][1] == 0).all()
    assert mixed["tier"] == ["robot", "human"]


def test_window_spec_from_params_follows_the_model():
    from motus.config import WindowConfig
    from motus.data.loader import window_spec_from_params
    from motus.model import build_config

    tiny = build_config("tiny")
    spec = window_spec_from_params(WindowConfig(), tiny, action_dim=14)
    assert (spec.chunk, spec.video_action_ratio, spec.downsample) == (8, 2, 3)
    assert spec.future_frames == tiny.num_frames - 1 and spec.image_size == (64, 64)
    full = build_config("full")
    spec = window_spec_from_params(WindowConfig(), full)  # the official RoboTwin geometry: 16 actions : 8 frames
    assert (spec.chunk, spec.video_action_ratio, spec.downsample, spec.future_frames) == (16, 2, 3, 8)
    with pytest.raises(ValueError, match="data.window.video_action_ratio=4"):
        window_spec_from_params(WindowConfig(video_action_ratio=4), tiny)
