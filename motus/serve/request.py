"""A policy request, checked against the served version's serving contract before the model sees it.

A request is JSON (HTTP body or one websocket message):

    {"image": IMAGE,                       # the trained view, [H, W, 3] uint8 (the contract's image_size)
     "images": {VIEW: IMAGE, ...},         # instead of "image": the cameras by name; where the trained view is a
                                           # three-view composition, its head / left / right wrist cameras
     "state": [float, ...],                # proprioception, state_dim values, in the robot's units (none for
                                           # a video model)
     "instruction": "pick up the cube",
     "tier": "target-aloha-transfer",      # the action space (optional when the model has one)
     "mode": "vla" | "joint" | "wm",       # default vla (a video model: vgm, its only mode)
     "actions": [[float, ...], ...],       # wm only: the chunk to imagine, [chunk, action_dim], robot units
     "seed": int,                          # optional: the noise of this answer (same seed, same actions)
     "steps": int,                         # optional: Euler steps (default: the model's)
     "return_frames": bool}                # joint / wm: also return the predicted frames

IMAGE is a nested list, or {"shape": [H, W, 3], "dtype": "uint8", "b64": base64 of the raw bytes} (what
`encode_image` writes: 4/3 bytes per pixel channel instead of a list's ~4). Anything else is a `BadRequest` naming
the field, the value expected and the value got: the server answers it with a 4xx and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..contracts import ActionSpace, ServingContract

FIELDS = ("image", "images", "state", "instruction", "tier", "mode", "actions", "seed", "steps", "return_frames")
MAX_STEPS = 1000


class BadRequest(ValueError):
    """A request that does not match the served version's signature; `field` names what to fix."""

    def __init__(self, field: str, expected: Any, got: Any):
        self.field, self.expected, self.got = field, expected, got
        super().__init__(f"{field}: expected {expected}, got {got}")

    def to_json(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field, "expected": str(self.expected), "got": str(self.got)}


@dataclass
class PolicyRequest:
    space: ActionSpace
    frame: np.ndarray  # [H, W, 3] uint8 of the trained view (composed when the view is a composition)
    state: np.ndarray  # [state_dim] float32, robot units
    instruction: str
    mode: str = "vla"
    seed: int | None = None
    steps: int | None = None
    actions: np.ndarray | None = None  # wm: [chunk, action_dim]
    return_frames: bool = False

    @property
    def group(self) -> tuple[Any, ...]:
        """Requests that can share one batched forward pass."""
        return self.space.tier, self.mode, self.steps, self.return_frames


def decode_image(value: Any, field: str, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    expected = f"a [{h}, {w}, 3] uint8 image (nested list, or {{shape, dtype: uint8, b64}})"
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"shape", "dtype", "b64"})
        if unknown:
            raise BadRequest(f"{field}.{unknown[0]}", "only shape, dtype, b64", f"'{unknown[0]}'")
        if value.get("dtype", "uint8") != "uint8":
            raise BadRequest(f"{field}.dtype", "uint8", repr(value.get("dtype")))
        shape = value.get("shape")
        if not (isinstance(shape, list) and all(isinstance(v, int) for v in shape)):
            raise BadRequest(f"{field}.shape", f"[{h}, {w}, 3]", repr(shape))
        try:
            raw = base64.b64decode(value.get("b64", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise BadRequest(f"{field}.b64", "base64 of the image's bytes", "invalid base64") from None
        if len(raw) != int(np.prod(shape)):
            raise BadRequest(f"{field}.b64", f"{int(np.prod(shape))} bytes for shape {shape}", f"{len(raw)} bytes")
        a = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    else:
        try:
            a = np.asarray(value)
        except (ValueError, TypeError):
            raise BadRequest(field, expected, "a ragged list") from None
        if a.dtype.kind not in "iu" or a.size and (a.min() < 0 or a.max() > 255):
            raise BadRequest(field, expected, f"values of type {a.dtype} in "
                             f"[{a.min() if a.size else '-'}, {a.max() if a.size else '-'}]"
                             if a.dtype.kind in "iuf" else f"a list of {a.dtype}")
        a = a.astype(np.uint8)
    if a.shape != (h, w, 3):
        raise BadRequest(field, expected, f"shape {list(a.shape)}")
    return a


def _vector(value: Any, field: str, n: int) -> np.ndarray:
    expected = f"{n} numbers"
    if not isinstance(value, (list, np.ndarray)):
        raise BadRequest(field, expected, type(value).__name__)
    try:
        a = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise BadRequest(field, expected, "non-numbers") from None
    if a.shape != (n,):
        raise BadRequest(field, expected, f"shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise BadRequest(field, "finite numbers", "NaN or infinity")
    return a.astype(np.float32)


def _integer(value: Any, field: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(field, f"an integer in [{lo}, {hi}]", repr(value))
    return value


def parse_request(body: Any, contract: ServingContract) -> PolicyRequest:
    """A JSON request -> the checked inputs of one plan, or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("request", "a JSON object", type(body).__name__)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"one of the fields {list(FIELDS)}", "an unknown field")
    tiers = [s.tier for s in contract.spaces]
    tier = body.get("tier")
    if tier is None and len(tiers) > 1:
        raise BadRequest("tier", f"one of {tiers} (this model acts in {len(tiers)} action spaces)", "nothing")
    if tier is not None and tier not in tiers:
        raise BadRequest("tier", f"one of {tiers}", repr(tier))
    space = contract.space(tier)
    mode = body.get("mode", contract.modes[0])
    if mode not in contract.modes:
        raise BadRequest("mode", f"one of {list(contract.modes)}", repr(mode))

    frame = _frame(body, space)
    if not space.acts:  # a video model reads no state
        if body.get("state") not in (None, []):
            raise BadRequest("state", "no state (a video model reads none)", "a state")
        state = np.zeros(0, dtype=np.float32)
    elif "state" not in body:
        raise BadRequest("state", f"{space.state_dim} numbers", "nothing")
    else:
        state = _vector(body["state"], "state", space.state_dim)
    instruction = body.get("instruction")
    if not isinstance(instruction, str):
        raise BadRequest("instruction", "a string", type(instruction).__name__ if instruction is not None else
                         "nothing")
    actions = None
    if mode == "wm":
        if "actions" not in body:
            raise BadRequest("actions", f"[{contract.chunk}, {space.action_dim}] numbers (wm imagines a given chunk)",
                             "nothing")
        try:
            actions = np.asarray(body["actions"], dtype=np.float64)
        except (ValueError, TypeError):
            raise BadRequest("actions", f"[{contract.chunk}, {space.action_dim}] numbers", "non-numbers") from None
        if actions.shape != (contract.chunk, space.action_dim):
            raise BadRequest("actions", f"shape [{contract.chunk}, {space.action_dim}]", f"shape {list(actions.shape)}")
        if not np.isfinite(actions).all():
            raise BadRequest("actions", "finite numbers", "NaN or infinity")
        actions = actions.astype(np.float32)
    elif "actions" in body:
        raise BadRequest("actions", "no actions (only wm mode takes them)", f"actions in mode '{mode}'")
    seed = _integer(body["seed"], "seed", 0, 2**63 - 1) if body.get("seed") is not None else None
    steps = _integer(body["steps"], "steps", 1, MAX_STEPS) if body.get("steps") is not None else None
    want_frames = body.get("return_frames", False)
    if not isinstance(want_frames, bool):
        raise BadRequest("return_frames", "true or false", repr(want_frames))
    if want_frames and mode == "vla":
        raise BadRequest("return_frames", "false in vla mode (it predicts no frames: use joint)", "true")
    return PolicyRequest(space, frame, state, instruction, mode, seed, steps, actions, want_frames)


def _frame(body: dict[str, Any], space: ActionSpace) -> np.ndarray:
    """The trained view's frame: given directly, or composed from the cameras it was composed from at ingest."""
    if "image" in body and "images" in body:
        raise BadRequest("images", "either image or images", "both")
    if space.source_views:
        from ..data.episode import compose_three_view

        views = body.get("images")
        if not isinstance(views, dict):
            raise BadRequest("images", f"the cameras {list(space.source_views)} (the trained view '{space.view}' "
                             "is their three-view composition)", type(views).__name__ if views is not None else
                             "nothing")
        missing = [v for v in space.source_views if v not in views]
        if missing:
            raise BadRequest(f"images.{missing[0]}", f"the cameras {list(space.source_views)}",
                             f"cameras {sorted(views)}")
        # every camera at the size that composes to the stored view: the head on top, the two wrists at half size
        # side by side below it, so the stored view is 3/2 as high as one camera
        h, w = space.image_size
        cams = [decode_image(views[v], f"images.{v}", (h * 2 // 3, w))[None] for v in space.source_views]
        try:
            return compose_three_view(*cams)[0]
        except ValueError as e:
            raise BadRequest("images", "cameras that compose to the trained view", str(e)) from None
    if "images" in body:
        views = body["images"]
        if not isinstance(views, dict) or set(views) != {space.view}:
            raise BadRequest("images", f"one camera, '{space.view}'",
                             sorted(views) if isinstance(views, dict) else type(views).__name__)
        return decode_image(views[space.view], f"images.{space.view}", space.image_size)
    if "image" not in body:
        raise BadRequest("image", f"the '{space.view}' camera's frame, {list(space.image_size)} x 3 uint8", "nothing")
    return decode_image(body["image"], "image", space.image_size)
