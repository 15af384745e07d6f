"""Read the official Motus folder layout into `Episode`s.

::

    <root>/videos/<stem>.mp4   the episode's clip, already the composed three-view image (head on top, the two
                               wrist cameras side by side below at half size) -> view "three_view"
    <root>/qpos/<stem>.pt      torch tensor [T, D] (D = 14 on ALOHA: 2 x (6 joints + gripper)), one row per
                               video frame, saved with torch.save
    <root>/metas/<stem>.txt    the instruction text; every non-empty line is one instruction

Files are matched by stem; the videos define the episodes (a qpos/meta file without a video is ignored).

qpos convention: qpos is the robot's joint-position trajectory, so ``state = qpos`` and the action at step t
is the absolute joint target reached next, ``actions[t] = qpos[t + 1]``, the last step repeating its own
qpos (``actions[T-1] = qpos[T-1]``, i.e. "hold"). Both are float32 [T, D]. ``extra["action_convention"]``
records this.

A stem whose qpos or meta file is missing, whose qpos is not a 2-D tensor, whose video does not decode, or
whose video and qpos lengths differ yields a ``SourceError`` naming the file; a root without ``videos/``
raises ``SourceUnreadable``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..episode import Episode
from ..video import read_video
from . import SourceError, SourceUnreadable, sanitize_episode_id

__all__ = ["read_motus_folder", "qpos_to_actions"]

THREE_VIEW = "three_view"
DEFAULT_FPS = 30.0


def qpos_to_actions(qpos: np.ndarray) -> np.ndarray:
    """Absolute joint targets from a joint-position trajectory: actions[t] = qpos[t+1], last one held."""
    qpos = np.asarray(qpos, dtype=np.float32)
    if len(qpos) == 0:
        return qpos.copy()
    return np.concatenate([qpos[1:], qpos[-1:]], axis=0)


def _load_qpos(path: Path) -> np.ndarray:
    import torch  # a hard dependency of motus, imported lazily to keep `import motus.data` light

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        arr = obj.detach().to(torch.float32).numpy()
    else:
        arr = np.asarray(obj, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"qpos must be a non-empty [T, D] tensor, found shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_motus_folder(root: str | Path, embodiment: str = "aloha", fps: float | None = None, *,
                      view: str = THREE_VIEW) -> Iterator[Episode | SourceError]:
    """Episodes of a Motus-layout folder, sorted by stem. ``fps`` defaults to the video's own frame rate."""
    root = Path(root)
    videos = root / "videos"
    if not videos.is_dir():
        raise SourceUnreadable(videos, "missing: not a Motus layout folder (videos/, qpos/, metas/)")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    paths = sorted(p for p in videos.glob("*.mp4") if p.is_file())
    return _iterate(root, paths, embodiment, fps, view)


def _iterate(root: Path, paths: list[Path], embodiment: str, fps: float | None,
             view: str) -> Iterator[Episode | SourceError]:
    for video in paths:
        stem = video.stem
        qpos_path, meta_path = root / "qpos" / f"{stem}.pt", root / "metas" / f"{stem}.txt"
        missing = [p for p in (qpos_path, meta_path) if not p.is_file()]
        if missing:
            yield SourceError(stem, str(missing[0]), "missing " + " and ".join(str(p) for p in missing))
            continue
        try:
            qpos = _load_qpos(qpos_path)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
            yield SourceError(stem, str(qpos_path), f"unreadable qpos: {type(e).__name__}: {e}")
            continue
        try:
            text = meta_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            yield SourceError(stem, str(meta_path), f"unreadable instruction text: {e}")
            continue
        try:
            decoded = read_video(video)
        except (ValueError, OSError) as e:
            yield SourceError(stem, str(video), f"undecodable video: {e}")
            continue
        if len(decoded.frames) != len(qpos):
            yield SourceError(stem, str(video), f"length mismatch: video has {len(decoded.frames)} frames, "
                                                f"{qpos_path.name} has {len(qpos)} steps")
            continue
        yield Episode(
            episode_id=sanitize_episode_id(stem),
            frames={view: decoded.frames},
            actions=qpos_to_actions(qpos),
            state=qpos,
            instructions=[line.strip() for line in text.splitlines() if line.strip()],
            fps=float(fps or decoded.fps or DEFAULT_FPS),
            embodiment=embodiment,
            source=f"motus:{root.name}",
            extra={"stem": stem, "action_convention": "actions[t] = qpos[t+1], last held"},
        )
