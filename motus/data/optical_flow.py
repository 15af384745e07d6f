"""Optical flow between adjacent frames, rendered as RGB flow images (the latent-action input).

Motus treats optical flow as a pixel-level "delta action": flow between adjacent frames is rendered as an
RGB image, which a DC-AE reconstructs and a small encoder projects to a 14-d latent action.

Flow models (`FlowModel`: frames [T, H, W, 3] uint8 -> flow [T-1, H, W, 2] float32, (dx, dy) in pixels):

* `DISFlow`         OpenCV's DIS optical flow on grayscale frames; CPU, no weights, the default.
* `TorchScriptFlow` a learned model (RAFT, DPFlow, ...) exported with `torch.jit` whose weights the user
                    supplies as a LOCAL file. Weights are never downloaded.

Colour coding (`flow_to_rgb`): the HSV simplification of the Middlebury colour wheel, implemented here so it
can be inverted exactly (up to uint8 rounding) by `rgb_to_flow`:

    hue        = direction, atan2(dy, dx) mapped to [0, 1): +x (right) = red, +y (down, image rows) = hue 1/4
                 (yellow-green), -x = cyan, -y = hue 3/4 (violet)
    saturation = min(|flow| / max_magnitude, 1)
    value      = 1 (255)

so zero flow is white (255, 255, 255) and a flow of magnitude >= max_magnitude is fully saturated (clipped).
`max_magnitude` is either fixed by the caller or, when None, a robust per-clip value (99th percentile of the
magnitude, floored at 1e-6) that is returned so it can be recorded next to the images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
MIN_MAX_MAGNITUDE = 1e-6
ROBUST_PERCENTILE = 99.0
# rgb_to_flow(flow_to_rgb(f, m), m) is within this many `m` of f for |f| <= m (uint8 rounding of the
# colour channels; measured worst case ~0.0045 m over 2e6 random vectors; the bound leaves headroom)
ROUND_TRIP_TOLERANCE = 0.01

_DIS_CACHE: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------- flow models


def _dis(preset: str) -> Any:
    if preset not in DIS_PRESETS:
        raise ValueError(f"unknown DIS preset '{preset}' (choose from {sorted(DIS_PRESETS)})")
    if preset not in _DIS_CACHE:
        _DIS_CACHE[preset] = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
    return _DIS_CACHE[preset]


def _gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB frame [H, W, 3], got {img.dtype} {img.shape}")
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def dis_flow(prev: np.ndarray, nxt: np.ndarray, preset: str = "medium") -> np.ndarray:
    """Flow [H, W, 2] float32 (dx, dy in pixels) that maps `prev` onto `nxt`: nxt(p + flow(p)) ~ prev(p).

    Both frames are uint8 RGB [H, W, 3]; OpenCV DIS runs on grayscale. One DIS object per preset is reused."""
    a, b = _gray(prev), _gray(nxt)
    if a.shape != b.shape:
        raise ValueError(f"frames differ in size: {prev.shape} vs {nxt.shape}")
    flow = _dis(preset).calc(a, b, None)
    return np.asarray(flow, dtype=np.float32)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(frames) < 2:
        raise ValueError(f"need at least 2 frames for optical flow, got {len(frames)}")
    return frames


@runtime_checkable
class FlowModel(Protocol):
    """frames uint8 [T, H, W, 3] -> flow float32 [T-1, H, W, 2] between frames t and t+1 (dx, dy pixels)."""

    name: str

    def __call__(self, frames: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


class DISFlow:
    """OpenCV DIS optical flow (CPU, no weights)."""

    name = "dis"

    def __init__(self, preset: str = "medium"):
        _dis(preset)  # validate the preset early
        self.preset = preset

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = _check_frames(frames)
        return np.stack([dis_flow(frames[t], frames[t + 1], self.preset) for t in range(len(frames) - 1)])

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "preset": self.preset}


class TorchScriptFlow:
    """A learned flow model (RAFT, DPFlow, ...) exported with `torch.jit.script`/`torch.jit.trace`.

    Expected signature of the scripted module's forward:

        forward(img1: Tensor[B, 3, H, W] float32 RGB in [0, 255], img2: same) -> Tensor[B, 2, H, W]

    returning (dx, dy) in pixels from img1 to img2. Models that return a list/tuple of iterative refinements
    (RAFT style) are accepted: the LAST element is used. The weights must be a local file; they are never
    downloaded."""

    name = "torchscript"

    def __init__(self, weights: str | Path, device: str = "cpu", batch_size: int = 8):
        import torch

        self.weights = Path(weights).expanduser()
        if not self.weights.is_file():
            raise FileNotFoundError(
                f"TorchScript flow weights not found at '{self.weights}'; supply a local file exported with "
                f"torch.jit (weights are never downloaded)")
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.module = torch.jit.load(str(self.weights), map_location=device)
        self.module.eval()
        h = hashlib.sha256()
        with open(self.weights, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        self.weights_sha256 = h.hexdigest()

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import torch

        frames = _check_frames(frames)
        t, h, w, _ = frames.shape
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        out = []
        with torch.inference_mode():
            for i in range(0, t - 1, self.batch_size):
                j = min(i + self.batch_size, t - 1)
                img1, img2 = x[i:j].to(self.device), x[i + 1:j + 1].to(self.device)
                flow = self.module(img1, img2)
                if isinstance(flow, list | tuple):
                    flow = flow[-1]
                if flow.shape != (j - i, 2, h, w):
                    raise ValueError(f"{self.weights}: model returned flow of shape {tuple(flow.shape)}, "
                                     f"expected {(j - i, 2, h, w)} ([B, 2, H, W])")
                out.append(flow.permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "preset": None, "weights": self.weights.name,
                "weights_sha256": self.weights_sha256}


def make_flow_model(kind: str = "dis", **options: Any) -> FlowModel:
    """`make_flow_model("dis", preset="medium")` or `make_flow_model("torchscript", weights=path, device=...)`."""
    if kind == "dis":
        return DISFlow(**options)
    if kind == "torchscript":
        if "weights" not in options:
            raise ValueError("flow model 'torchscript' needs weights=<local path to a torch.jit export>")
        return TorchScriptFlow(**options)
    raise ValueError(f"unknown flow model '{kind}' (choose 'dis' or 'torchscript')")


# ------------------------------------------------------------------------------------------ colour coding


def robust_max_magnitude(flow: np.ndarray, percentile: float = ROBUST_PERCENTILE) -> float:
    """The `percentile` of |flow| over every pixel, floored at MIN_MAX_MAGNITUDE."""
    mag = np.hypot(flow[..., 0], flow[..., 1])
    value = float(np.percentile(mag, percentile)) if mag.size else 0.0
    return max(value, MIN_MAX_MAGNITUDE)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """h in [0, 1), s in [0, 1], value 1 -> float RGB in [0, 1] (standard hexcone)."""
    h6 = (h % 1.0) * 6.0
    c = s
    x = c * (1.0 - np.abs(h6 % 2.0 - 1.0))
    sector = np.floor(h6).astype(np.int64) % 6
    zero = np.zeros_like(c)
    r = np.choose(sector, [c, x, zero, zero, x, c])
    g = np.choose(sector, [x, c, c, x, zero, zero])
    b = np.choose(sector, [zero, zero, x, c, c, x])
    m = 1.0 - c
    return np.stack([r + m, g + m, b + m], axis=-1)


def _rgb_to_hs(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_hsv_to_rgb` (value taken as the max channel)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0,
                 np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(c > 0, h / 6.0, 0.0)
    s = np.where(mx > 0, c / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s


def flow_to_rgb(flow: np.ndarray, max_magnitude: float | None = None) -> tuple[np.ndarray, float]:
    """flow [..., H, W, 2] -> (uint8 RGB [..., H, W, 3], the max_magnitude used).

    `max_magnitude` None = robust per-clip normalisation (99th percentile magnitude over all of `flow`);
    record the returned value to decode or compare images later."""
    flow = np.asarray(flow, dtype=np.float64)
    if flow.shape[-1] != 2:
        raise ValueError(f"expected flow [..., H, W, 2], got {flow.shape}")
    if max_magnitude is None:
        used = robust_max_magnitude(flow)
    else:
        used = float(max_magnitude)
        if not np.isfinite(used) or used <= 0:
            raise ValueError(f"max_magnitude must be a positive finite number, got {max_magnitude}")
    dx, dy = flow[..., 0], flow[..., 1]
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    sat = np.clip(np.hypot(dx, dy) / used, 0.0, 1.0)
    rgb = _hsv_to_rgb(hue, np.nan_to_num(sat))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8), used


def rgb_to_flow(rgb: np.ndarray, max_magnitude: float) -> np.ndarray:
    """Approximate inverse of `flow_to_rgb` -> float32 [..., H, W, 2]. Exact up to uint8 rounding for
    |flow| <= max_magnitude (error < ROUND_TRIP_TOLERANCE * max_magnitude); larger flow was clipped."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected RGB [..., H, W, 3], got {rgb.shape}")
    h, s = _rgb_to_hs(rgb.astype(np.float64) / 255.0)
    mag, ang = s * float(max_magnitude), h * 2 * np.pi
    return np.stack([mag * np.cos(ang), mag * np.sin(ang)], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------ per episode


def resize_flow(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """flow [..., H, W, 2] -> [..., h, w, 2] for size=(h, w) with INTER_AREA; vectors scaled to the new grid."""
    h, w = int(size[0]), int(size[1])
    lead, (hh, ww) = flow.shape[:-3], flow.shape[-3:-1]
    flat = flow.reshape(-1, hh, ww, 2)
    out = np.stack([cv2.resize(np.ascontiguousarray(f, dtype=np.float32), (w, h), interpolation=cv2.INTER_AREA)
                    for f in flat]) if len(flat) else np.zeros((0, h, w, 2), np.float32)
    out = out.reshape(*lead, h, w, 2).astype(np.float32)
    out[..., 0] *= w / ww
    out[..., 1] *= h / hh
    return out


def episode_flow(frames: np.ndarray, model: FlowModel, stride: int = 1) -> np.ndarray:
    """Raw flow between frames t and t+stride for every valid t: float32 [T-stride, H, W, 2]."""
    frames = _check_frames(frames)
    if stride < 1 or stride >= len(frames):
        raise ValueError(f"stride {stride} needs 1 <= stride < T (T = {len(frames)})")
    if stride == 1:
        return model(frames)
    n = len(frames) - stride
    out: np.ndarray | None = None
    for r in range(stride):  # frames r, r+s, r+2s, ... are adjacent for the model
        sub = frames[r::stride]
        if len(sub) < 2:
            continue
        f = model(sub)
        if out is None:
            out = np.empty((n, *f.shape[1:]), np.float32)
        out[r::stride] = f[: len(range(r, n, stride))]
    assert out is not None
    return out


def composition_cells(views: int, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Where each of `views` cameras sits in one image of `size` (height, width), as (top, left, height, width):
    one view fills it; with more, the first (the head camera) spans the top half and the others share the bottom
    half side by side: head over the wrists as in Motus's three-view frames (`data.episode.compose_three_view`),
    in halves so that a square flow image gives the wrists square cells."""
    h, w = int(size[0]), int(size[1])
    if views < 1:
        raise ValueError("need at least one view")
    if views == 1:
        return [(0, 0, h, w)]
    top, rest = h // 2, views - 1
    if w < rest or top < 1:
        raise ValueError(f"{views} views do not fit a {h}x{w} image")
    edges = [round(i * w / rest) for i in range(rest + 1)]
    return [(0, 0, top, w)] + [(top, edges[i], h - top, edges[i + 1] - edges[i]) for i in range(rest)]


def compose_flows(flows: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Flows of several cameras (each [T, H_i, W_i, 2], same T) -> one flow [T, h, w, 2] in the cells of
    `composition_cells`; each view is resized into its cell with its vectors scaled to the cell's grid."""
    lengths = {len(f) for f in flows}
    if len(lengths) != 1:
        raise ValueError(f"views' flows differ in length: {sorted(lengths)}")
    out = np.zeros((lengths.pop(), int(size[0]), int(size[1]), 2), np.float32)
    for f, (top, left, h, w) in zip(flows, composition_cells(len(flows), size), strict=True):
        out[:, top:top + h, left:left + w] = resize_flow(f, (h, w))
    return out


def episode_flow_images(frames: np.ndarray, model: FlowModel, size: tuple[int, int] | None = None,
                        max_magnitude: float | None = None, stride: int = 1
                        ) -> tuple[np.ndarray, dict[str, Any]]:
    """Flow images for one clip: uint8 [T-stride, h, w, 3] and the metadata to record next to them.

    size=(height, width) resizes the flow (INTER_AREA, vectors scaled) before colouring; max_magnitude None
    normalises by the clip's 99th-percentile magnitude (after resizing), which is returned in meta. `frames` may
    be a list of several cameras' clips: their flows are composed into one image (`compose_flows`; needs size)."""
    if isinstance(frames, (list, tuple)):
        if size is None:
            raise ValueError("composing several views' flow needs an image size")
        flow = compose_flows([episode_flow(f, model, stride) for f in frames], size)
    else:
        flow = episode_flow(frames, model, stride)
        if size is not None:
            flow = resize_flow(flow, size)
    images, used = flow_to_rgb(flow, max_magnitude)
    desc = model.describe() if hasattr(model, "describe") else {"model": getattr(model, "name", type(model).__name__)}
    meta = {"max_magnitude": used, "normalisation": "fixed" if max_magnitude is not None else "p99",
            "model": desc.get("model"), "preset": desc.get("preset"), "stride": stride,
            "size": list(images.shape[1:3]),
            **{k: v for k, v in desc.items() if k not in ("model", "preset")}}
    return images, meta
