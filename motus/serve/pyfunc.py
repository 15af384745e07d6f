"""The `python_function` flavour of a registered Motus policy: what `mlflow.pyfunc.load_model` and
`mlflow models serve` call (`_load_pyfunc`), named by the MLmodel file the registry writes
(`motus.track.registry.flavour`).

    model = mlflow.pyfunc.load_model("models:/motus-aloha@champion")
    chunks = model.predict({"image": frames_uint8_BHW3, "state": qpos_BD, "instruction": ["..."] * B},
                           params={"mode": "vla", "seed": 0})          # [B, chunk, action_dim], robot units

Each row is checked like a `motus serve` request (image size, state width, instruction type; the error names the
field). A Stage 1 video model takes images and instructions and returns the predicted future frames
[B, F, H, W, 3] uint8 (mode vgm). With `seed` >= 0 row i's noise is seeded with `seed + i`, so a row's answer
equals the one `motus serve` gives for the same observation and seed. The trained view is sent as stored; a three-view model takes the
composed image (`motus.data.episode.compose_three_view`). The world-model mode (given actions -> frames) is
served by `motus serve` only: a pyfunc signature's inputs cannot be optional.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .request import BadRequest, parse_request
from .served import ServedVersion

PYFUNC_MODES = ("vla", "joint", "vgm")


class MotusPolicyPyfunc:
    def __init__(self, served: ServedVersion):
        self.served = served

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        params = dict(params or {})
        contract = self.served.contract
        mode = params.get("mode") or contract.modes[0]
        allowed = [m for m in PYFUNC_MODES if m in contract.modes]
        if mode not in allowed:
            raise BadRequest("params.mode", f"one of {allowed} (wm: use `motus serve`)", repr(mode))
        if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):  # a one-row-per-sample frame
            model_input = {c: np.stack(list(model_input[c])) if c != "instruction" else np.asarray(model_input[c])
                           for c in model_input.columns}
        if not isinstance(model_input, dict):
            raise BadRequest("input", "a dict of image, state, instruction arrays", type(model_input).__name__)
        needed = ("image", "state", "instruction") if contract.is_policy else ("image", "instruction")
        missing = [k for k in needed if k not in model_input]
        if missing:
            raise BadRequest(missing[0], f"the inputs {list(needed)}", "nothing")
        images = np.asarray(model_input["image"])
        states = np.asarray(model_input["state"]) if contract.is_policy else np.zeros((len(images), 0))
        instructions = np.atleast_1d(np.asarray(model_input["instruction"], dtype=object))
        if images.ndim == 3:  # one observation
            images, states = images[None], np.atleast_2d(states)
        if not len(images) == len(states) == len(instructions):
            raise BadRequest("input", "as many images, states and instructions",
                             f"{len(images)}, {len(states)}, {len(instructions)}")
        seed = int(params.get("seed", -1))
        steps = int(params.get("steps", 0)) or None
        tier = params.get("tier") or None
        requests = []
        for i in range(len(images)):
            body = {"image": images[i], "state": np.asarray(states[i], dtype=np.float64) if contract.is_policy else None,
                    "instruction": str(instructions[i]), "mode": mode, "tier": tier,
                    "seed": seed + i if seed >= 0 else None, "steps": steps}
            try:
                requests.append(parse_request({k: v for k, v in body.items() if v is not None},
                                              self.served.contract))
            except BadRequest as e:
                raise BadRequest(f"row {i}: {e.field}", e.expected, e.got) from None
        plans = self.served.plan(requests)
        if not contract.is_policy:
            return np.stack([p.frames for p in plans])
        return np.stack([p.actions for p in plans]).astype(np.float64)


def _load_pyfunc(data_path: str, model_config: Any = None) -> MotusPolicyPyfunc:
    """MLflow's entry point: the artifact folder of a version (its export files) -> a loaded, warmed-up policy."""
    served = ServedVersion.load(data_path)
    served.warm_up()
    return MotusPolicyPyfunc(served)
