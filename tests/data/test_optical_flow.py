"""Optical flow (DIS / TorchScript), the flow colour wheel, and sharded per-episode feature stores."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from motus.data.features import Feature, FeatureError, FeatureWriter, feature_dir
from motus.data.optical_flow import (
    ROUND_TRIP_TOLERANCE,
    DISFlow,
    TorchScriptFlow,
    compose_flows,
    composition_cells,
    dis_flow,
    episode_flow_images,
    flow_to_rgb,
    make_flow_model,
    resize_flow,
    rgb_to_flow,
)

MARGIN = 16


def texture(size: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (Gaussian-blurred noise stretched to the full uint8 range)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((size, size, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)


def shifted(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, img.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def interior_median(flow: np.ndarray) -> np.ndarray:
    return np.median(flow[MARGIN:-MARGIN, MARGIN:-MARGIN].reshape(-1, 2), axis=0)


@pytest.mark.parametrize("shift", [(3.0, -2.0), (1.5, 0.5)])
def test_dis_recovers_known_translation(shift):
    img = texture()
    est = interior_median(dis_flow(img, shifted(img, *shift)))
    err = np.abs(est - np.array(shift))
    print(f"shift {shift}: estimated {est.round(3).tolist()}, |error| {err.round(3).tolist()}")
    assert err.max() < 0.5, (shift, est)


def test_dis_model_shapes_and_presets():
    img = texture()
    frames = np.stack([img, shifted(img, 1, 0), shifted(img, 2, 0)])
    flow = DISFlow()(frames)
    assert flow.shape == (2, 96, 96, 2) and flow.dtype == np.float32
    assert make_flow_model("dis", preset="fast").preset == "fast"
    with pytest.raises(ValueError, match="preset"):
        DISFlow("slowest")
    with pytest.raises(ValueError, match="unknown flow model"):
        make_flow_model("raft")


def test_colour_wheel_round_trip_and_normalisation():
    rng = np.random.default_rng(1)
    flow = rng.uniform(-5, 5, (4, 32, 32, 2)).astype(np.float32)
    rgb, used = flow_to_rgb(flow, max_magnitude=8.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 32, 32, 3) and used == 8.0
    back = rgb_to_flow(rgb, used)
    assert np.abs(back - flow).max() < ROUND_TRIP_TOLERANCE * used

    # robust (p99) normalisation is returned so it can be recorded; clipped beyond it
    rgb2, used2 = flow_to_rgb(flow, None)
    mag = np.hypot(flow[..., 0], flow[..., 1])
    assert used2 == pytest.approx(np.percentile(mag, 99))
    inside = mag <= used2
    back2 = rgb_to_flow(rgb2, used2)
    assert np.abs(back2 - flow)[inside].max() < ROUND_TRIP_TOLERANCE * used2
    # all-zero flow: floored normalisation, white image
    zero_rgb, zero_used = flow_to_rgb(np.zeros((8, 8, 2)), None)
    assert zero_used == pytest.approx(1e-6)
    assert (zero_rgb == 255).all()


def test_colour_wheel_directions_have_distinct_hues():
    dirs = {"right": (1, 0), "down": (0, 1), "left": (-1, 0), "up": (0, -1)}
    colours = {k: tuple(flow_to_rgb(np.array([[v]], np.float32), 1.0)[0][0, 0]) for k, v in dirs.items()}
    assert colours["right"] == (255, 0, 0)  # +x is red
    assert colours["left"] == (0, 255, 255)  # -x is cyan
    assert len(set(colours.values())) == 4
    # half the magnitude = half saturation, same hue
    half = flow_to_rgb(np.array([[[0.5, 0.0]]], np.float32), 1.0)[0][0, 0]
    assert tuple(half) == (255, 128, 128)
    with pytest.raises(ValueError):
        flow_to_rgb(np.zeros((2, 2, 2)), 0.0)


def test_episode_flow_images_shapes_resize_and_stride():
    img = texture()
    frames = np.stack([shifted(img, 2 * t, 0) for t in range(5)])
    images, meta = episode_flow_images(frames, DISFlow(), size=None, max_magnitude=4.0)
    assert images.shape == (4, 96, 96, 3)
    assert meta["normalisation"] == "fixed" and meta["max_magnitude"] == 4.0
    assert meta["model"] == "dis" and meta["preset"] == "medium"

    small, meta_s = episode_flow_images(frames, DISFlow(), size=(48, 32), max_magnitude=4.0)
    assert small.shape == (4, 48, 32, 3)
    # vectors scaled with the grid: width 96 -> 32 is a third, so the 2 px shift decodes as dx ~ 2/3 px
    dx = np.median(rgb_to_flow(small, 4.0)[:, 8:-8, 6:-6, 0])
    assert dx == pytest.approx(2 / 3, abs=0.2)

    auto, meta_a = episode_flow_images(frames, DISFlow(), size=None, max_magnitude=None, stride=2)
    assert auto.shape == (3, 96, 96, 3) and meta_a["normalisation"] == "p99" and meta_a["stride"] == 2
    assert meta_a["max_magnitude"] == pytest.approx(4.0, abs=0.6)  # stride 2 -> 4 px motion


def test_resize_flow_scales_vectors():
    flow = np.zeros((2, 40, 60, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3.0, -6.0
    out = resize_flow(flow, (20, 30))
    assert out.shape == (2, 20, 30, 2)
    np.testing.assert_allclose(out[..., 0], 1.5, atol=1e-5)
    np.testing.assert_allclose(out[..., 1], -3.0, atol=1e-5)


def test_several_views_compose_head_over_wrists_each_in_its_own_cell():
    """Three cameras in one 16 px flow image: the head camera over the top half, the wrists side by side below,
    each view's vectors scaled to its cell's grid; a view's motion stays in its cell."""
    assert composition_cells(1, (16, 16)) == [(0, 0, 16, 16)]
    assert composition_cells(3, (16, 16)) == [(0, 0, 8, 16), (8, 0, 8, 8), (8, 8, 8, 8)]
    assert composition_cells(2, (15, 10)) == [(0, 0, 7, 10), (7, 0, 8, 10)]
    with pytest.raises(ValueError, match="4 views do not fit a 16x2 image"):
        composition_cells(4, (16, 2))
    head, left, right = (np.zeros((3, 64, 64, 2), np.float32) for _ in range(3))
    head[..., 0] = 4.0   # the head camera sees motion to the right
    right[..., 1] = 8.0  # the right wrist's view moves down; the left wrist sees nothing
    out = compose_flows([head, left, right], (16, 16))
    assert out.shape == (3, 16, 16, 2)
    np.testing.assert_allclose(out[:, :8, :, 0], 1.0, atol=1e-5)  # 64 -> 16 px wide: 4 px -> 1 px
    np.testing.assert_allclose(out[:, :8, :, 1], 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, 8:, :8], 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, 8:, 8:, 1], 1.0, atol=1e-5)  # 64 -> 8 px tall: 8 px -> 1 px
    with pytest.raises(ValueError, match="differ in length"):
        compose_flows([head, left[:2]], (16, 16))
    img = texture()
    frames = np.stack([shifted(img, 2 * t, 0) for t in range(4)])
    images, meta = episode_flow_images([frames, frames, frames], DISFlow(), size=(16, 16), max_magnitude=1.0)
    assert images.shape == (3, 16, 16, 3) and meta["size"] == [16, 16]
    with pytest.raises(ValueError, match="needs an image size"):
        episode_flow_images([frames, frames], DISFlow(), size=None)


class _ConstantFlow(torch.nn.Module):
    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = img1.shape
        flow = torch.zeros(b, 2, h, w)
        flow[:, 0] = 1.25
        flow[:, 1] = (img2 - img1).mean(dim=(1, 2, 3)).view(b, 1, 1)
        return [flow * 0.0, flow]  # RAFT-style refinements: the last one counts


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated upstream, still supported
def test_torchscript_flow(tmp_path):
    path = tmp_path / "flow.pt"
    torch.jit.script(_ConstantFlow()).save(str(path))
    model = make_flow_model("torchscript", weights=path, batch_size=2)
    frames = np.stack([np.full((8, 12, 3), 10 * t, np.uint8) for t in range(5)])
    flow = model(frames)
    assert flow.shape == (4, 8, 12, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(flow[..., 0], 1.25)
    np.testing.assert_allclose(flow[..., 1], 10.0)  # images passed as float in [0, 255]
    assert model.describe()["weights_sha256"]
    images, meta = episode_flow_images(frames, model, size=None, max_magnitude=None)
    assert images.shape == (4, 8, 12, 3) and meta["model"] == "torchscript"

    with pytest.raises(FileNotFoundError, match="never downloaded") as e:
        TorchScriptFlow(tmp_path / "missing.pt")
    assert "missing.pt" in str(e.value)


def _write(root, episodes, shard_bytes=1 << 30, compress=False, meta=None):
    out = feature_dir(root, "flow", "sim")
    w = FeatureWriter(out, "flow", "sim", "abc123", shard_bytes=shard_bytes, compress=compress, meta=meta)
    for eid, arrays in episodes.items():
        w.add(eid, arrays)
    return out, w.close()


def _episodes(n=5):
    rng = np.random.default_rng(2)
    return {f"ep_{i}": {"flow": rng.integers(0, 255, (3 + i, 16, 16, 3), dtype=np.uint8),
                        "latent_actions": rng.normal(size=(2 + i, 14)).astype(np.float32)} for i in range(n)}


@pytest.mark.parametrize("compress", [False, True])
def test_feature_round_trip_multiple_shards(tmp_path, compress):
    eps = _episodes()
    out, manifest = _write(tmp_path / "a", eps, shard_bytes=2000, compress=compress, meta={"max_magnitude": 4.0})
    assert out == tmp_path / "a" / "flow" / "sim"
    assert len(manifest.shards) > 1 and manifest.episodes == 5
    assert manifest.arrays == {"flow": {"dtype": "|u1", "shape": [16, 16, 3]},
                                  "latent_actions": {"dtype": "<f4", "shape": [14]}}
    f = Feature(out)
    assert f.episode_ids == list(eps) and f.tier_hash == "abc123" and f.meta == {"max_magnitude": 4.0}
    for eid, arrays in eps.items():
        for name, a in arrays.items():
            got = f.get(eid, name)
            assert got.dtype == a.dtype
            np.testing.assert_array_equal(got, a)
    assert f.verify() == []
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # temp folder renamed away
    with pytest.raises(KeyError):
        f.get("nope", "flow")
    with pytest.raises(KeyError):
        f.get("ep_0", "nope")


def test_feature_deterministic_and_verify(tmp_path):
    eps = _episodes()
    _, m1 = _write(tmp_path / "a", eps, shard_bytes=3000, compress=True)
    out, m2 = _write(tmp_path / "b", eps, shard_bytes=3000, compress=True)
    assert m1.content_hash == m2.content_hash
    assert [s["sha256"] for s in m1.shards] == [s["sha256"] for s in m2.shards]
    _, m3 = _write(tmp_path / "c", eps, shard_bytes=3000, compress=True, meta={"max_magnitude": 2.0})
    assert m3.content_hash != m1.content_hash

    shard = out / m2.shards[1]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = Feature(out).verify()
    assert len(problems) == 1 and str(shard) in problems[0]
    shard.unlink()
    f = Feature(out)
    assert "missing" in f.verify()[0]
    eid = next(r["id"] for r in f.index if r["shard"] == 1)
    with pytest.raises(FeatureError, match="shard-000001.tar"):
        f.get(eid, "flow")


def test_feature_errors(tmp_path):
    with pytest.raises(FeatureError, match="manifest.json"):
        Feature(tmp_path / "nothing")
    out, _ = _write(tmp_path, _episodes(2))
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(FeatureError, match="manifest.json"):
        Feature(out)
    (out / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(FeatureError, match="schema_version"):
        Feature(out)

    w = FeatureWriter(tmp_path / "x", "flow", "sim", "h")
    w.add("a", {"z": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="duplicate"):
        w.add("a", {"z": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="earlier episodes"):
        w.add("b", {"z": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="arrays"):
        w.add("c", {"y": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="episode_id"):
        w.add("bad.id", {"z": np.zeros((2, 3), np.float32)})
    w.abort()
    assert not any(p.name.startswith(".x.tmp") for p in tmp_path.iterdir())
    with pytest.raises(FeatureError, match="no episodes"):
        FeatureWriter(tmp_path / "y", "flow", "sim", "h").close()


def test_a_tiers_flow_feature_composes_the_views_params_name_and_refuses_a_missing_one(tmp_path, monkeypatch):
    """`latent_action.flow.views.<tier>`: the flow of those cameras in one image per pair; a view the tier does
    not hold is an error naming the key, the tier and the views it has."""
    from motus.config import validate_params
    from motus.data.episode import Episode
    from motus.data.latent_actions import build_flow_feature
    from motus.data.tier import TierSpec, TierWriter

    from ..support.project import shipped_params

    monkeypatch.chdir(tmp_path)
    views = ["top", "left_wrist", "right_wrist"]
    w = TierWriter(tmp_path / "data" / "tiers" / "cams", TierSpec("cams", level=4, embodiment="aloha", action_dim=None,
                                                                      codec="npz"))
    img = texture(64)
    moves = {"top": (0.4, 0.0), "left_wrist": (0.5, 0.0), "right_wrist": (0.0, 1.0)}  # px per frame at 64 px
    frames = {v: np.stack([shifted(img, moves[v][0] * t, moves[v][1] * t) for t in range(7)]) for v in views}
    w.add(Episode("ep0", frames, actions=None, state=None, instructions=[], fps=10.0, embodiment="aloha",
                  source="test"))
    w.close()
    raw = shipped_params()
    raw["latent_action"]["flow"]["views"] = {"cams": views}
    raw["tiers"]["cams"] = {"level": 4, "embodiment": "aloha", "description": "three cameras",
                            "source": {"kind": "simulator", "options": {"sim": "aloha-random", "n": 1}}}
    params = validate_params(raw)
    build_flow_feature(params, "cams")
    f = Feature(tmp_path / "data" / "features" / "flow" / "cams")
    assert f.meta["views"] == views and f.meta["stride"] == 3
    flow = rgb_to_flow(f.get("ep0", "flow"), f.meta["max_magnitude"])
    assert flow.shape == (4, 16, 16, 2)
    # each cell shows its own camera's motion over the 3-frame stride in its cell's grid (head 16 px wide from 64,
    # wrists 8 px square from 64): (dx, dy) in flow-image pixels
    expect = [((2, 6, 4, 12), (3 * 0.4 * 16 / 64, 0.0)), ((10, 14, 2, 6), (3 * 0.5 * 8 / 64, 0.0)),
              ((10, 14, 10, 14), (0.0, 3 * 1.0 * 8 / 64))]
    for (r0, r1, c0, c1), want in expect:
        seen = np.median(flow[:, r0:r1, c0:c1].reshape(-1, 2), axis=0)
        np.testing.assert_allclose(seen, want, atol=0.06, err_msg=f"cell at row {r0}, column {c0}")
    raw["latent_action"]["flow"]["views"] = {"cams": ["top", "wrist"]}
    with pytest.raises(ValueError, match=r"latent_action.flow.views.cams: tier 'cams' has no view wrist \(it has "
                                         r"top, left_wrist, right_wrist\)"):
        build_flow_feature(validate_params(raw), "cams")
