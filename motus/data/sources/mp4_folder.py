"""Read a folder of plain videos as unlabelled episodes (level 2 of the data pyramid: actions=None).

Every file matching ``pattern`` under ``root`` (sorted by relative path) is one episode with a single view,
``"main"``. Its id is the relative path without the extension, sanitised into the episode-id alphabet
(``sub/clip 1.mp4`` -> ``sub_clip_1-<8 hex>``; a path already in the alphabet is kept as is).

* ``max_frames`` keeps only the first N frames (decoding stops there).
* ``resize=(height, width)`` rescales through FFmpeg's scaler via PyAV (area filter); no OpenCV needed.
* ``fps_override`` replaces the container's frame rate (which is otherwise used, 30 if it has none).
* ``instruction_from``: ``"none"`` (no instruction), ``"filename"`` (the file stem with ``_``/``-`` runs as
  spaces, e.g. ``pick_up-the_cup.mp4`` -> "pick up the cup") or ``"sidecar"`` (the non-empty lines of
  ``<same stem>.txt`` beside the video; a missing sidecar gives no instruction, and the tier's
  ``require_instruction`` check decides whether that is acceptable).

A video that does not decode yields a ``SourceError``; a missing root raises ``SourceUnreadable``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from ..episode import Episode
from ..video import read_video
from . import SourceError, SourceUnreadable, sanitize_episode_id

__all__ = ["read_mp4_folder"]

VIEW = "main"
DEFAULT_FPS = 30.0
InstructionFrom = Literal["none", "filename", "sidecar"]


def read_mp4_folder(root: str | Path, *, pattern: str = "**/*.mp4", max_frames: int | None = None,
                    resize: tuple[int, int] | None = None, fps_override: float | None = None,
                    embodiment: str = "human",
                    instruction_from: InstructionFrom = "none") -> Iterator[Episode | SourceError]:
    """Unlabelled episodes (actions=None) from every video under ``root`` matching ``pattern``."""
    root = Path(root)
    if not root.is_dir():
        raise SourceUnreadable(root, "video folder does not exist")
    if instruction_from not in ("none", "filename", "sidecar"):
        raise ValueError(f"instruction_from must be 'none', 'filename' or 'sidecar', got {instruction_from!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if resize is not None and (len(resize) != 2 or min(resize) < 1):
        raise ValueError(f"resize must be (height, width) >= 1, got {resize!r}")
    if fps_override is not None and not fps_override > 0:
        raise ValueError(f"fps_override must be positive, got {fps_override!r}")
    paths = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    return _iterate(root, paths, max_frames, resize, fps_override, embodiment, instruction_from)


def _instructions(path: Path, mode: str) -> list[str]:
    if mode == "filename":
        text = re.sub(r"[_\-\s]+", " ", path.stem).strip()
        return [text] if text else []
    if mode == "sidecar":
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            return [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
    return []


def _iterate(root: Path, paths: list[Path], max_frames: int | None, resize: tuple[int, int] | None,
             fps_override: float | None, embodiment: str, mode: str) -> Iterator[Episode | SourceError]:
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            video = read_video(path, max_frames=max_frames, size=tuple(resize) if resize else None)
        except (ValueError, OSError) as e:  # VideoDecodeError is a ValueError
            yield SourceError(rel, str(path), f"undecodable video: {e}", "video.undecodable")
            continue
        try:
            instructions = _instructions(path, mode)
        except (OSError, UnicodeDecodeError) as e:
            yield SourceError(rel, str(path.with_suffix(".txt")), f"unreadable sidecar instruction: {e}",
                              "instruction.unreadable")
            continue
        yield Episode(
            episode_id=sanitize_episode_id(Path(rel).with_suffix("").as_posix()),
            frames={VIEW: video.frames},
            actions=None,
            state=None,
            instructions=instructions,
            fps=float(fps_override or video.fps or DEFAULT_FPS),
            embodiment=embodiment,
            source=f"mp4:{root.name}",
            extra={"path": rel, "native_fps": video.fps},
        )
