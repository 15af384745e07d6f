"""Frame codecs and the on-disk sources (LeRobot v2/v3, Motus folder layout, mp4 folder).

Every fixture is written here, into tmp_path, with pyarrow, torch.save and our own encoder: nothing is
downloaded.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from motus.data.episode import EPISODE_ID, Episode, compose_three_view
from motus.data.sources import SourceError, SourceUnreadable, sanitize_episode_id
from motus.data.sources.lerobot import read_lerobot
from motus.data.sources.motus_layout import read_motus_folder
from motus.data.sources.mp4_folder import read_mp4_folder
from motus.data.video import (
    VideoDecodeError,
    decode_frames,
    decode_image,
    decode_mp4,
    encode_frames,
    encode_mp4,
    mp4_encoder,
    psnr,
    read_video,
)

FPS = 10
MARK = 8  # side of the flat marker block in the top-left corner of every synthetic frame


# ------------------------------------------------------------------------------------------------ helpers


def smooth_clip(t: int, h: int, w: int, phase: float = 0.0) -> np.ndarray:
    """A smooth moving colour field, the kind of content a video codec is built for."""
    tt = np.arange(t)[:, None, None] + phase
    y = np.arange(h)[None, :, None]
    x = np.arange(w)[None, None, :]
    r = 128 + 90 * np.sin(2 * np.pi * (x / max(w, 1) + tt / 40))
    g = 128 + 90 * np.cos(2 * np.pi * (y / max(h, 1) - tt / 50))
    b = 128 + 60 * np.sin(2 * np.pi * ((x + y) / max(h + w, 1) + tt / 30))
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).clip(0, 255).astype(np.uint8)


def marked_clip(first: int, t: int, h: int, w: int, phase: float = 0.0) -> np.ndarray:
    """smooth_clip with a flat block whose grey level encodes the global frame number (first + i)."""
    clip = smooth_clip(t, h, w, phase)
    for i in range(t):
        clip[i, :MARK, :MARK] = marker_value(first + i)
    return clip


def marker_value(g: int) -> int:
    return 30 + 11 * g


def read_marker(frame: np.ndarray) -> int:
    """The global frame number a decoded frame carries (inverse of marker_value, robust to codec noise)."""
    level = float(frame[1:MARK - 1, 1:MARK - 1].mean())
    return int(round((level - 30) / 11))


def png_bytes(img: np.ndarray) -> bytes:
    """A minimal RGB PNG encoder (zlib + CRC), independent of the decoder under test."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def vec_array(rows: np.ndarray, fixed: bool) -> pa.Array:
    typ = pa.list_(pa.float32(), rows.shape[1]) if fixed else pa.list_(pa.float32())
    return pa.array(rows.tolist(), type=typ)


def features(cams: dict[str, tuple[int, int]], kind: str, action_dim: int, state_dim: int) -> dict:
    feats = {
        "action": {"dtype": "float32", "shape": [action_dim], "names": [f"a{i}" for i in range(action_dim)]},
        "observation.state": {"dtype": "float32", "shape": [state_dim], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    for cam, (h, w) in cams.items():
        feats[f"observation.images.{cam}"] = {"dtype": kind, "shape": [h, w, 3], "names": ["height", "width", "channel"]}
    return feats


TASKS = ["pick up the red cube", "open the drawer"]


def make_v2(root: Path, *, lengths=(6, 8), cams=None, kind="video", version="v2.1") -> dict:
    """A LeRobot v2.x dataset; returns the ground truth per episode."""
    cams = cams or {"top": (32, 48), "wrist": (32, 48)}
    a_dim, s_dim = 4, 3
    info = {
        "codebase_version": version, "robot_type": "koch", "total_episodes": len(lengths),
        "total_frames": int(sum(lengths)), "total_tasks": len(TASKS), "chunks_size": 1000, "fps": FPS,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": ("videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
                       if kind == "video" else None),
        "features": features(cams, kind, a_dim, s_dim),
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(TASKS)))
    rng = np.random.default_rng(0)
    truth, offset, ep_lines = {}, 0, []
    for ep, n in enumerate(lengths):
        task = ep % len(TASKS)
        ep_lines.append(json.dumps({"episode_index": ep, "tasks": [TASKS[task]], "length": n}))
        actions = rng.normal(size=(n, a_dim)).astype(np.float32)
        state = rng.normal(size=(n, s_dim)).astype(np.float32)
        frames = {cam: marked_clip(0, n, h, w, phase=7 * ci + 3 * ep)
                  for ci, (cam, (h, w)) in enumerate(cams.items())}
        cols = {
            "action": vec_array(actions, fixed=True),
            "observation.state": vec_array(state, fixed=False),
            "timestamp": pa.array((np.arange(n) / FPS).astype(np.float32)),
            "frame_index": pa.array(np.arange(n), pa.int64()),
            "episode_index": pa.array(np.full(n, ep), pa.int64()),
            "index": pa.array(offset + np.arange(n), pa.int64()),
            "task_index": pa.array(np.full(n, task), pa.int64()),
        }
        if kind == "image":
            struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            for cam, clip in frames.items():
                cols[f"observation.images.{cam}"] = pa.array(
                    [{"bytes": png_bytes(f), "path": f"frame_{i:06d}.png"} for i, f in enumerate(clip)], struct_type)
        data = root / f"data/chunk-000/episode_{ep:06d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), data)
        if kind == "video":
            for cam, clip in frames.items():
                video = root / f"videos/chunk-000/observation.images.{cam}/episode_{ep:06d}.mp4"
                video.parent.mkdir(parents=True, exist_ok=True)
                video.write_bytes(encode_mp4(clip, FPS))
        truth[ep] = {"actions": actions, "state": state, "frames": frames, "task": TASKS[task]}
        offset += n
    (root / "meta/episodes.jsonl").write_text("\n".join(ep_lines) + "\n")
    return truth


def make_v3(root: Path, *, lengths=(5, 7, 6), cams=None) -> dict:
    """A LeRobot v3.0 dataset: every episode packed into one data parquet and one mp4 per camera."""
    cams = cams or {"front": (32, 48), "wrist": (32, 32)}
    a_dim, s_dim = 6, 5
    info = {
        "codebase_version": "v3.0", "robot_type": "so100", "total_episodes": len(lengths),
        "total_frames": int(sum(lengths)), "total_tasks": len(TASKS), "chunks_size": 1000,
        "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "fps": FPS, "splits": {},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features(cams, "video", a_dim, s_dim),
    }
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    # pandas writes the task text as its index: a column named __index_level_0__
    pq.write_table(pa.table({"task_index": pa.array([0, 1], pa.int64()),
                             "__index_level_0__": pa.array(TASKS)}), root / "meta/tasks.parquet")
    rng = np.random.default_rng(1)
    n_total = int(sum(lengths))
    actions = rng.normal(size=(n_total, a_dim)).astype(np.float32)
    state = rng.normal(size=(n_total, s_dim)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    ep_col = np.concatenate([np.full(n, e) for e, n in enumerate(lengths)])
    frame_col = np.concatenate([np.arange(n) for n in lengths])
    task_col = np.concatenate([np.full(n, e % 2) for e, n in enumerate(lengths)])
    data = root / "data/chunk-000/file-000.parquet"
    data.parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "action": vec_array(actions, fixed=True),
        "observation.state": vec_array(state, fixed=True),
        "timestamp": pa.array((frame_col / FPS).astype(np.float32)),
        "frame_index": pa.array(frame_col, pa.int64()),
        "episode_index": pa.array(ep_col, pa.int64()),
        "index": pa.array(np.arange(n_total), pa.int64()),
        "task_index": pa.array(task_col, pa.int64()),
    }), data)
    clips = {}
    for ci, (cam, (h, w)) in enumerate(cams.items()):
        clip = marked_clip(0, n_total, h, w, phase=5 * ci)  # marker = global frame number in the file
        clips[cam] = clip
        video = root / f"videos/observation.images.{cam}/chunk-000/file-000.mp4"
        video.parent.mkdir(parents=True)
        video.write_bytes(encode_mp4(clip, FPS))
    ep_rows = {
        "episode_index": pa.array(range(len(lengths)), pa.int64()),
        "tasks": pa.array([[TASKS[e % 2]] for e in range(len(lengths))], pa.list_(pa.string())),
        "length": pa.array(lengths, pa.int64()),
        "data/chunk_index": pa.array([0] * len(lengths), pa.int64()),
        "data/file_index": pa.array([0] * len(lengths), pa.int64()),
        "dataset_from_index": pa.array(starts, pa.int64()),
        "dataset_to_index": pa.array(starts + np.asarray(lengths), pa.int64()),
        "stats/action/mean": pa.array([[0.0] * a_dim] * len(lengths), pa.list_(pa.float64())),
    }
    for cam in cams:
        key = f"observation.images.{cam}"
        ep_rows[f"videos/{key}/chunk_index"] = pa.array([0] * len(lengths), pa.int64())
        ep_rows[f"videos/{key}/file_index"] = pa.array([0] * len(lengths), pa.int64())
        ep_rows[f"videos/{key}/from_timestamp"] = pa.array(starts / FPS, pa.float64())
        ep_rows[f"videos/{key}/to_timestamp"] = pa.array((starts + np.asarray(lengths)) / FPS, pa.float64())
    pq.write_table(pa.table(ep_rows), root / "meta/episodes/chunk-000/file-000.parquet")
    return {"actions": actions, "state": state, "starts": starts, "lengths": lengths, "clips": clips}


def split(items) -> tuple[list[Episode], list[SourceError]]:
    items = list(items)
    eps = [x for x in items if isinstance(x, Episode)]
    errs = [x for x in items if isinstance(x, SourceError)]
    assert len(eps) + len(errs) == len(items)
    return eps, errs


# ------------------------------------------------------------------------------------------------ codecs


def test_npz_round_trip_is_exact_and_deterministic():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 9, 7, 3), dtype=np.uint8)
    data, ext = encode_frames(frames, "npz", FPS)
    assert ext == "npz"
    out = decode_frames(data, ext)
    assert out.dtype == np.uint8 and np.array_equal(out, frames)
    assert decode_frames(data, ".npz").shape == frames.shape
    assert encode_frames(frames, "npz", FPS)[0] == data  # fixed zip timestamps: same bytes, same DVC hash
    with pytest.raises(VideoDecodeError):
        decode_frames(data[: len(data) // 2], "npz")


def test_mp4_round_trip_psnr_and_determinism():
    clip = smooth_clip(24, 64, 64)
    data, ext = encode_frames(clip, "mp4", FPS)
    assert ext == "mp4" and data[4:8] == b"ftyp"
    out = decode_frames(data, "mp4")
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert psnr(clip, out) > 30.0
    assert encode_mp4(clip, FPS) == data
    odd_width = smooth_clip(12, 64, 96)  # widths like this made x264's AVX-512 path unstable run to run
    assert len({encode_mp4(odd_width, FPS) for _ in range(5)}) == 1
    assert mp4_encoder() in ("libx264", "libopenh264", "mpeg4")


def test_mp4_fallback_encoder_and_odd_sizes():
    clip = smooth_clip(8, 32, 32)
    assert psnr(clip, decode_mp4(encode_mp4(clip, FPS, codec="mpeg4"))) > 30.0
    odd = smooth_clip(6, 17, 23)
    out = decode_mp4(encode_mp4(odd, FPS))
    assert out.shape == odd.shape  # padded by edge replication, cropped back through the size tag
    assert psnr(odd, out) > 28.0


def test_mp4_decode_options_and_errors(tmp_path):
    clip = marked_clip(0, 20, 32, 32)
    data = encode_mp4(clip, FPS)
    video = read_video(data)
    assert video.fps == pytest.approx(FPS) and np.allclose(video.times, np.arange(20) / FPS)
    assert decode_mp4(data, max_frames=5).shape == (5, 32, 32, 3)
    assert decode_mp4(data, size=(16, 24)).shape == (20, 16, 24, 3)
    window = read_video(data, start_s=1.0, end_s=1.5)  # seek into the middle
    assert [read_marker(f) for f in window.frames] == [10, 11, 12, 13, 14]
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    assert decode_mp4(path).shape == clip.shape

    for bad in (b"", b"definitely not a video" * 10, data[: len(data) // 2], data[:64]):
        with pytest.raises(VideoDecodeError):
            decode_mp4(bad)
    with pytest.raises(FileNotFoundError):
        decode_mp4(tmp_path / "absent.mp4")
    with pytest.raises(ValueError):
        encode_mp4(clip.astype(np.float32), FPS)
    with pytest.raises(ValueError):
        encode_frames(clip, "webm", FPS)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode_frames(data, "avi")


def test_decode_image_png():
    img = smooth_clip(1, 9, 13)[0]
    assert np.array_equal(decode_image(png_bytes(img)), img)
    with pytest.raises(VideoDecodeError):
        decode_image(b"\x89PNG\r\n\x1a\n broken")


def test_sanitize_episode_id():
    assert sanitize_episode_id("ep_000001") == "ep_000001"
    a, b = sanitize_episode_id("a b"), sanitize_episode_id("a_b")
    assert a != b and EPISODE_ID.match(a)
    assert sanitize_episode_id("sub/clip 1.v2") == sanitize_episode_id("sub/clip 1.v2")
    assert EPISODE_ID.match(sanitize_episode_id("x" * 500)) and EPISODE_ID.match(sanitize_episode_id("ü"))


# ------------------------------------------------------------------------------------------------ LeRobot


def test_lerobot_v21_videos(tmp_path):
    root = tmp_path / "koch_pick"
    truth = make_v2(root)
    eps, errs = split(read_lerobot(root))
    assert errs == [] and [e.episode_id for e in eps] == ["ep000000", "ep000001"]
    for ep in eps:
        idx = ep.extra["episode_index"]
        t = truth[idx]
        n = len(t["actions"])
        assert ep.problems() == []
        assert ep.views == ["top", "wrist"]
        assert ep.frames["top"].shape == (n, 32, 48, 3) and ep.frames["top"].dtype == np.uint8
        for cam in ("top", "wrist"):
            assert psnr(t["frames"][cam], ep.frames[cam]) > 30
        assert ep.actions.dtype == np.float32 and np.array_equal(ep.actions, t["actions"])
        assert ep.state.dtype == np.float32 and np.array_equal(ep.state, t["state"])
        assert ep.instructions == [t["task"]]
        assert ep.fps == FPS and ep.embodiment == "koch" and ep.source == "lerobot:koch_pick"
        assert ep.extra == {"lerobot_version": "v2.1", "episode_index": idx}
        json.dumps(ep.metadata())

    only, errs = split(read_lerobot(root, views=["wrist"], episodes=[1, 5], embodiment="koch_v2"))
    assert [e.episode_id for e in only] == ["ep000001"] and only[0].views == ["wrist"]
    assert only[0].embodiment == "koch_v2"
    assert [e.episode_ref for e in errs] == ["ep000005"]
    with pytest.raises(SourceUnreadable, match="no camera"):
        read_lerobot(root, views=["side"])


def test_lerobot_v20_embedded_png_images(tmp_path):
    root = tmp_path / "pngs"
    truth = make_v2(root, kind="image", version="v2.0", lengths=(4, 3))
    (root / "meta/episodes.jsonl").write_text("\n".join(json.dumps({"episode_index": i, "length": n})
                                                        for i, n in enumerate((4, 3))))  # no tasks here
    eps, errs = split(read_lerobot(root))
    assert errs == [] and len(eps) == 2
    for ep in eps:
        t = truth[ep.extra["episode_index"]]
        for cam in ("top", "wrist"):
            assert np.array_equal(ep.frames[cam], t["frames"][cam])  # PNG is lossless
        assert np.array_equal(ep.actions, t["actions"])
        assert ep.instructions == [t["task"]]  # from task_index through tasks.jsonl
        assert ep.extra["lerobot_version"] == "v2.0" and ep.problems() == []


def test_lerobot_v30_packed_files_are_sliced_per_episode(tmp_path):
    root = tmp_path / "so100_stack"
    truth = make_v3(root)
    eps, errs = split(read_lerobot(root))
    assert errs == [] and [e.episode_id for e in eps] == ["ep000000", "ep000001", "ep000002"]
    for i, ep in enumerate(eps):
        lo, n = int(truth["starts"][i]), truth["lengths"][i]
        assert ep.problems() == [] and ep.num_frames == n
        assert ep.frames["front"].shape == (n, 32, 48, 3) and ep.frames["wrist"].shape == (n, 32, 32, 3)
        for cam in ("front", "wrist"):
            assert [read_marker(f) for f in ep.frames[cam]] == list(range(lo, lo + n))
            assert psnr(truth["clips"][cam][lo:lo + n], ep.frames[cam]) > 30
        assert np.array_equal(ep.actions, truth["actions"][lo:lo + n])
        assert np.array_equal(ep.state, truth["state"][lo:lo + n])
        assert ep.instructions == [TASKS[i % 2]]
        assert ep.embodiment == "so100" and ep.extra == {"lerobot_version": "v3.0", "episode_index": i}

    middle, errs = split(read_lerobot(root, episodes=[1], views=["wrist"]))
    assert errs == [] and [read_marker(f) for f in middle[0].frames["wrist"]] == list(range(5, 12))

    # tasks from meta/tasks.parquet when the episode rows carry none
    table = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").drop_columns(["tasks"])
    pq.write_table(table, root / "meta/episodes/chunk-000/file-000.parquet")
    eps, _ = split(read_lerobot(root, episodes=[2]))
    assert eps[0].instructions == [TASKS[0]]


def test_lerobot_three_view_composition(tmp_path):
    root = tmp_path / "aloha"
    cams = {"cam_high": (16, 24), "cam_left_wrist": (16, 24), "cam_right_wrist": (16, 24)}
    make_v2(root, cams=cams, lengths=(5,))
    views = ("cam_high", "cam_left_wrist", "cam_right_wrist")
    [full] = list(read_lerobot(root))
    [ep] = list(read_lerobot(root, compose_three_view=views))
    assert ep.views == ["three_view"] and ep.frames["three_view"].shape == (5, 24, 24, 3)
    assert np.array_equal(ep.frames["three_view"], compose_three_view(*(full.frames[v] for v in views)))
    [both] = list(read_lerobot(root, views=["cam_high"], compose_three_view=views))
    assert both.views == ["cam_high", "three_view"] and both.problems() == []


def test_lerobot_bad_episodes_do_not_abort_the_read(tmp_path):
    root = tmp_path / "broken"
    make_v2(root, lengths=(4, 5, 6))
    bad_video = root / "videos/chunk-000/observation.images.top/episode_000000.mp4"
    bad_video.write_bytes(bad_video.read_bytes()[:200])  # truncated
    (root / "data/chunk-000/episode_000002.parquet").unlink()
    eps, errs = split(read_lerobot(root))
    assert [e.episode_id for e in eps] == ["ep000001"] and eps[0].problems() == []
    by_ref = {e.episode_ref: e for e in errs}
    assert set(by_ref) == {"ep000000", "ep000002"}
    assert by_ref["ep000000"].file == str(bad_video) and "video" in by_ref["ep000000"].reason
    assert by_ref["ep000002"].file.endswith("episode_000002.parquet") and "missing" in by_ref["ep000002"].reason

    lines = [json.loads(x) for x in (root / "meta/episodes.jsonl").read_text().splitlines()]
    lines[1]["length"] = 99
    (root / "meta/episodes.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    eps, errs = split(read_lerobot(root, episodes=[1]))
    assert eps == [] and "length mismatch" in errs[0].reason


def test_lerobot_v3_corrupt_video_and_missing_data(tmp_path):
    root = tmp_path / "v3broken"
    make_v3(root)
    (root / "videos/observation.images.wrist/chunk-000/file-000.mp4").write_bytes(b"\x00" * 1000)
    eps, errs = split(read_lerobot(root))
    assert eps == [] and len(errs) == 3 and all("wrist" in e.reason for e in errs)
    eps, errs = split(read_lerobot(root, views=["front"]))
    assert len(eps) == 3 and errs == []
    (root / "data/chunk-000/file-000.parquet").unlink()
    eps, errs = split(read_lerobot(root, views=["front"]))
    assert eps == [] and all(e.file.endswith("file-000.parquet") for e in errs)


def test_lerobot_unreadable_roots(tmp_path):
    root = tmp_path / "empty"
    (root / "meta").mkdir(parents=True)
    with pytest.raises(SourceUnreadable) as info:
        read_lerobot(root)
    assert str(root / "meta/info.json") in str(info.value) and info.value.path == str(root / "meta/info.json")
    (root / "meta/info.json").write_text("{not json")
    with pytest.raises(SourceUnreadable, match="bad JSON"):
        read_lerobot(root)
    (root / "meta/info.json").write_text(json.dumps({"codebase_version": "v1.6", "fps": 10, "features": {}}))
    with pytest.raises(SourceUnreadable, match="codebase_version"):
        read_lerobot(root)
    with pytest.raises(SourceUnreadable):
        read_lerobot(tmp_path / "nowhere")
    v3 = tmp_path / "v3"
    make_v3(v3)
    for f in (v3 / "meta/episodes").rglob("*.parquet"):
        f.unlink()
    with pytest.raises(SourceUnreadable, match="episode metadata"):
        read_lerobot(v3)


# ------------------------------------------------------------------------------------------- Motus folder


def test_motus_folder_layout(tmp_path):
    torch = pytest.importorskip("torch")
    root = tmp_path / "robotwin_task"
    for sub in ("videos", "qpos", "metas"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(2)
    qpos = {}
    for i, stem in enumerate(["0", "1", "2"]):
        clip = smooth_clip(6, 24, 16, phase=i)
        (root / "videos" / f"{stem}.mp4").write_bytes(encode_mp4(clip, 25))
        (root / "metas" / f"{stem}.txt").write_text(f"stack the blocks {i}\nsecond phrasing\n\n")
        if stem != "1":
            qpos[stem] = rng.normal(size=(6, 14)).astype(np.float32)
            torch.save(torch.from_numpy(qpos[stem]), root / "qpos" / f"{stem}.pt")
    eps, errs = split(read_motus_folder(root))
    assert [e.episode_id for e in eps] == ["0", "2"]
    assert len(errs) == 1 and errs[0].episode_ref == "1" and errs[0].file == str(root / "qpos/1.pt")
    for ep in eps:
        q = qpos[ep.episode_id]
        assert ep.problems() == [] and ep.views == ["three_view"] and ep.frames["three_view"].shape == (6, 24, 16, 3)
        assert np.array_equal(ep.state, q)
        assert np.array_equal(ep.actions[:-1], q[1:]) and np.array_equal(ep.actions[-1], q[-1])
        assert ep.instructions[0].startswith("stack the blocks") and len(ep.instructions) == 2
        assert ep.fps == pytest.approx(25) and ep.embodiment == "aloha" and ep.source == "motus:robotwin_task"

    torch.save(torch.zeros(9, 14), root / "qpos/2.pt")  # 9 steps for a 6-frame video
    eps, errs = split(read_motus_folder(root, embodiment="agilex", fps=30))
    assert [e.episode_id for e in eps] == ["0"] and eps[0].fps == 30 and eps[0].embodiment == "agilex"
    assert any("length mismatch" in e.reason for e in errs)
    with pytest.raises(SourceUnreadable):
        read_motus_folder(tmp_path / "no_layout")


# ------------------------------------------------------------------------------------------ mp4 folder


def test_mp4_folder_reader(tmp_path):
    root = tmp_path / "ego_clips"
    (root / "kitchen").mkdir(parents=True)
    (root / "kitchen/pour_the-water.mp4").write_bytes(encode_mp4(smooth_clip(12, 32, 48), 15))
    (root / "kitchen/pour_the-water.txt").write_text("pour water into the glass\n")
    (root / "wipe table.mp4").write_bytes(encode_mp4(smooth_clip(9, 48, 64), 24))
    (root / "broken.mp4").write_bytes(b"garbage" * 50)

    eps, errs = split(read_mp4_folder(root, resize=(24, 32), max_frames=10))
    assert [e.episode_ref for e in errs] == ["broken.mp4"]
    assert [e.extra["path"] for e in eps] == ["kitchen/pour_the-water.mp4", "wipe table.mp4"]
    for ep in eps:
        assert ep.actions is None and ep.state is None and ep.embodiment == "human"
        assert ep.views == ["main"] and ep.frames["main"].shape[1:] == (24, 32, 3)
        assert EPISODE_ID.match(ep.episode_id) and ep.problems() == [] and ep.instructions == []
    assert [e.num_frames for e in eps] == [10, 9]
    assert [e.fps for e in eps] == [15, 24]

    eps, _ = split(read_mp4_folder(root, pattern="kitchen/*.mp4", instruction_from="filename", fps_override=5))
    assert eps[0].instructions == ["pour the water"] and eps[0].fps == 5 and eps[0].frames["main"].shape == (12, 32, 48, 3)
    eps, _ = split(read_mp4_folder(root, instruction_from="sidecar"))
    assert [e.instructions for e in eps] == [["pour water into the glass"], []]
    assert len({e.episode_id for e in eps}) == 2 and all(re.match(r"^[A-Za-z0-9_-]+$", e.episode_id) for e in eps)
    with pytest.raises(SourceUnreadable):
        read_mp4_folder(tmp_path / "missing")


# ------------------------------------------------------------------------------- ingest accounts for everything


def _rewrite_parquet(path: Path, **columns: pa.Array) -> None:
    table = pq.read_table(path)
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), name, values)
    pq.write_table(table, path)


def test_lerobot_v3_misaligned_episodes_are_quarantined_with_coded_one_line_reasons(tmp_path):
    """Each way a LeRobot episode can pair frames with the wrong actions, on v3 data written here: quarantined
    (or, for a duplicate id, every claimant), one coded line each; the manifest accounts for every episode."""
    from motus.config import validate_params
    from motus.data.ingest import ingest_tier
    from motus.data.reasons import code_of
    from motus.data.tier import Tier

    root = tmp_path / "v3"
    lengths = (2, 3, 3, 2, 2, 2, 3, 2)  # 19 frames: the frame marker counts to 20
    truth = make_v3(root, lengths=lengths, cams={"top": (32, 48), "left_wrist": (32, 32)})
    starts = truth["starts"]
    rows = lambda e: slice(starts[e], starts[e] + lengths[e])  # noqa: E731
    data = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data)
    ts = np.asarray(table.column("timestamp").to_pylist(), np.float32)
    ts[rows(1)] -= 1.0                                     # ep1: negative timestamps
    s2 = ts[rows(2)].copy()
    s2[[1, 2]] = s2[[2, 1]]
    ts[rows(2)] = s2                                       # ep2: two rows out of order
    ts[rows(3)] *= 1.5                                     # ep3: 15 fps of timestamps in a 10 fps dataset
    actions = np.clip(truth["actions"], -2.5, 2.5)
    actions[starts[4] + 1, 1] = 50.0                       # ep4: a joint far outside its range
    action_rows = [list(map(float, a)) for a in actions]
    for i in range(*rows(5).indices(len(actions))):        # ep5: an action column narrower than declared
        action_rows[i] = action_rows[i][:5]
    _rewrite_parquet(data, timestamp=pa.array(ts), action=pa.array(action_rows, pa.list_(pa.float32())))
    ep_meta = root / "meta/episodes/chunk-000/file-000.parquet"
    meta = pq.read_table(ep_meta)
    pq.write_table(pa.concat_tables([meta, meta.slice(0, 1)]), ep_meta)  # ep0 claimed by two metadata rows

    params = validate_params({"tiers": {"so100": {"level": 6, "embodiment": "so100", "action_dim": 6, "source": {
        "kind": "lerobot", "options": {"root": str(root), "codec": "npz", "physical_bounds": [[-3, 3]] * 6}}}}})
    m = ingest_tier("so100", params.tiers["so100"], tmp_path / "tier")
    t = Tier(tmp_path / "tier")
    codes = {}
    for q in t.quarantined():
        assert q["reasons"] and all(len(r) <= 200 and r.isprintable() for r in q["reasons"]), q
        codes.setdefault(q["episode"], []).extend(code_of(r) for r in q["reasons"])
    assert codes == {"ep000000": ["episode.duplicate_id", "episode.duplicate_id"],
                     "ep000001": ["timestamps.negative"], "ep000002": ["timestamps.non_monotonic"],
                     "ep000003": ["timestamps.fps_mismatch"], "ep000004": ["actions.out_of_bounds"],
                     "ep000005": ["shape.mismatch"]}
    assert [r["id"] for r in t.index] == ["ep000006", "ep000007"]
    assert m.source_episodes == 9 == m.episodes + m.quarantined
    assert list(m.views) == ["top", "left_wrist"]  # info.json's camera order, not the alphabet's
    assert t.read_episode("ep000006").views == ["top", "left_wrist"]
    detail = (tmp_path / "tier/ingest.log").read_text()
    assert "declared at meta/episodes/chunk-000/file-000.parquet row 0 is also declared at" in detail


def test_lerobot_v2_video_with_frames_no_row_takes_is_refused(tmp_path):
    root = tmp_path / "v2"
    make_v2(root, lengths=(6, 8))
    longer = marked_clip(0, 9, 32, 48)  # episode 0 has 6 rows; its top video 9 frames
    (root / "videos/chunk-000/observation.images.top/episode_000000.mp4").write_bytes(encode_mp4(longer, FPS))
    eps, errs = split(read_lerobot(root))
    assert [e.episode_id for e in eps] == ["ep000001"]
    assert errs[0].code == "frames.count_mismatch" and "9 decoded frames span the episode's 6 rows" in errs[0].reason


def test_reason_lines_are_short_and_free_of_control_codes():
    from motus.data.reasons import code_of, coded, detail_line

    upstream = "\x1b[31mERROR\x1b[0m decoder said:\n" + "x" * 1170 + "\r\x07"
    line = coded("video.undecodable", upstream)
    assert len(line) <= 200 and line.isprintable() and line.startswith("video.undecodable: ERROR decoder said: xxx")
    assert code_of(line) == "video.undecodable" and code_of("an old reason: no code") == "unknown"
    full = detail_line("ep1", "a.mp4", "video.undecodable", upstream)
    assert full.count("x") >= 1170 and "\x1b" not in full and "\\x1b[31m" in full
    with pytest.raises(ValueError, match="dotted"):
        coded("Bad Code", "x")


def test_motus_layout_found_from_the_dataset_root(tmp_path):
    torch = pytest.importorskip("torch")
    for split_name, task in (("clean", "adjust_bottle"), ("randomized", "adjust_bottle")):
        folder = tmp_path / "robotwin2" / split_name / task
        for sub in ("videos", "qpos", "umt5_wan"):
            (folder / sub).mkdir(parents=True)
        (folder / "videos/0.mp4").write_bytes(encode_mp4(smooth_clip(4, 24, 16), 25))
        torch.save(torch.full((4, 14), 0.5), folder / "qpos/0.pt")
    eps, errs = split(read_motus_folder(tmp_path / "robotwin2"))
    assert not errs
    assert [e.episode_id for e in eps] == ["clean_adjust_bottle_0", "randomized_adjust_bottle_0"]
    assert [e.extra["task"] for e in eps] == ["clean/adjust_bottle", "randomized/adjust_bottle"]
    assert all(e.instructions == [] for e in eps)  # only pre-encoded text: reported by ingest, not an error
