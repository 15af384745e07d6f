"""Read the official Motus folder layout into `Episode`s.

A task folder::

    <task>/videos/<stem>.mp4   the episode's clip, already the composed three-view image (head on top, the two
                               wrist cameras side by side below at half size) -> view "three_view"
    <task>/qpos/<stem>.pt      torch tensor [T, D] (D = 14 on ALOHA: 2 x (6 joints + gripper)), one row per
                               video frame, saved with torch.save
    <task>/metas/<stem>.txt    the instruction text; every non-empty line is one instruction
    <task>/instructions/*.txt  (real-robot datasets) one instruction file for the whole task folder

``root`` is a task folder, or a dataset root holding task folders one or two levels down, as the official
datasets ship: RoboTwin 2.0 ``<root>/<clean|randomized>/<task>/...``, the real-robot sets
``<root>/<category>/<variant>/...``. From a dataset root, episode ids are the task folder's path joined with
the stem (``clean_adjust_bottle_0``), so equal stems of different tasks never collide, and ``extra["task"]``
records the folder. Files are matched by stem; the videos define the episodes (a qpos/meta file without a
video is ignored). Pre-encoded text embeddings (``umt5_wan/``) carry no text: an episode without a metas or
instructions file has no instruction, which ingest reports (and refuses only where the tier requires one).

qpos convention: qpos is the robot's joint-position trajectory, so ``state = qpos`` and the action at step t
is the absolute joint target reached next, ``actions[t] = qpos[t + 1]``, the last step repeating its own
qpos (``actions[T-1] = qpos[T-1]``, i.e. "hold"). Both are float32 [T, D]. ``extra["action_convention"]``
records this.

A stem whose qpos file is missing, whose qpos is not a 2-D tensor, whose video does not decode, or whose
video and qpos lengths differ yields a ``SourceError`` naming the file; a root that is neither a task folder
nor holds any raises ``SourceUnreadable``.
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


def task_folders(root: Path) -> list[Path]:
    """`root` itself when it is a task folder, else the task folders one or two levels below it, sorted."""
    if (root / "videos").is_dir():
        return [root]
    found = []
    for depth in ("*", "*/*"):
        found += [p for p in root.glob(depth) if p.is_dir() and (p / "videos").is_dir()]
    # a task folder's own subfolders (videos/, qpos/) are never task folders themselves
    return sorted(p for p in found if not any(q != p and q in p.parents for q in found))


def read_motus_folder(root: str | Path, embodiment: str = "aloha", fps: float | None = None, *,
                      view: str = THREE_VIEW) -> Iterator[Episode | SourceError]:
    """Episodes of a Motus-layout task folder or dataset root, by task folder then stem. ``fps`` defaults to
    the video's own frame rate."""
    root = Path(root)
    if not root.is_dir():
        raise SourceUnreadable(root, "missing: not a folder")
    tasks = task_folders(root)
    if not tasks:
        raise SourceUnreadable(root / "videos", "missing: not a Motus layout folder (videos/, qpos/, metas/), "
                                                "and no task folder holding one within two levels")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return (item for task in tasks for item in _iterate(root, task, embodiment, fps, view))


def _task_instructions(task: Path) -> list[str]:
    folder = task / "instructions"
    texts = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    return [line.strip() for t in texts for line in t.read_text(encoding="utf-8").splitlines() if line.strip()]


def _iterate(root: Path, task: Path, embodiment: str, fps: float | None,
             view: str) -> Iterator[Episode | SourceError]:
    rel = task.relative_to(root)
    prefix = "_".join(rel.parts)
    try:
        task_text = _task_instructions(task)
    except (OSError, UnicodeDecodeError) as e:
        task_text = []
        yield SourceError(prefix or task.name, str(task / "instructions"), f"unreadable instructions: {e}",
                          "instruction.unreadable")
    for video in sorted(p for p in (task / "videos").glob("*.mp4") if p.is_file()):
        stem = video.stem
        ref = f"{prefix}_{stem}" if prefix else stem
        qpos_path, meta_path = task / "qpos" / f"{stem}.pt", task / "metas" / f"{stem}.txt"
        if not qpos_path.is_file():
            yield SourceError(ref, str(qpos_path), f"missing {qpos_path}", "file.missing")
            continue
        try:
            qpos = _load_qpos(qpos_path)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
            yield SourceError(ref, str(qpos_path), f"unreadable qpos: {type(e).__name__}: {e}", "file.unreadable")
            continue
        instructions = task_text
        if meta_path.is_file():
            try:
                instructions = [ln.strip() for ln in meta_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                yield SourceError(ref, str(meta_path), f"unreadable instruction text: {e}", "instruction.unreadable")
                continue
        try:
            decoded = read_video(video)
        except (ValueError, OSError) as e:
            yield SourceError(ref, str(video), f"undecodable video: {e}", "video.undecodable")
            continue
        if len(decoded.frames) != len(qpos):
            yield SourceError(ref, str(video), f"length mismatch: video has {len(decoded.frames)} frames, "
                                               f"{qpos_path.name} has {len(qpos)} steps", "frames.count_mismatch")
            continue
        yield Episode(
            episode_id=sanitize_episode_id(ref),
            frames={view: decoded.frames},
            actions=qpos_to_actions(qpos),
            state=qpos,
            instructions=list(instructions),
            fps=float(fps or decoded.fps or DEFAULT_FPS),
            embodiment=embodiment,
            source=f"motus:{root.name}",
            extra={"stem": stem, "task": "/".join(rel.parts), "file": str(video),
                   "action_convention": "actions[t] = qpos[t+1], last held"},
        )
