"""The `python_function` flavour of a registered Motus policy: what `mlflow.pyfunc.load_model` and
`mlflow models serve` call (`_load_pyfunc`), named by the MLmodel file the registry writes
(`motus.track.registry.flavour`).

    model = mlflow.pyfunc.load_model("models:/motus-aloha@champion")
    chunks = model.predict({"image": frames_uint8_BHW3, "state": qpos_BD, "instruction": ["..."] * B},
                           params={"mode": "vla", "seed": 0})          # [B, chunk, action_dim], robot units

Each row is checked like a `motus serve` request (image size, state width, instruction type; the error names the
field). With `seed` >= 0 row i's noise is seeded with `seed + i`, so a row's chunk equals the one `motus serve`
answers for the same observation and seed. The trained view is sent as stored; a three-view model takes the
composed image (`motus.data.episode.compose_three_view`). The world-model mode (given actions -> frames) is
served by `motus serve` only: a pyfunc signature's inputs cannot be optional.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .request import BadRequest, parse_request
from .served import ServedVersion

PYFUNC_MODES = ("vla", "joint")


class MotusPolicyPyfunc:
    def __init__(self, served: ServedVersion):
        self.served = served

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        params = dict(params or {})
        mode = params.get("mode") or "vla"
        if mode not in PYFUNC_MODES:
            raise BadRequest("params.mode", f"one of {list(PYFUNC_MODES)} (wm: use `motus serve`)", repr(mode))
        if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):  # a one-row-per-sample frame
            model_input = {c: np.stack(list(model_input[c])) if c != "instruction" else np.asarray(model_input[c])
                           for c in model_input.columns}
        if not isinstance(model_input, dict):
            raise BadRequest("input", "a dict of image, state, instruction arrays", type(model_input).__name__)
        missing = [k for k in ("image", "state", "instruction") if k not in model_input]
        if missing:
            raise BadRequest(missing[0], "image [B, H, W, 3], state [B, D], instruction [B]", "nothing")
        images, states = np.asarray(model_input["image"]), np.asarray(model_input["state"])
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
            body = {"image": images[i], "state": np.asarray(states[i], dtype=np.float64),
                    "instruction": str(instructions[i]), "mode": mode, "tier": tier,
                    "seed": seed + i if seed >= 0 else None, "steps": steps}
            try:
                requests.append(parse_request({k: v for k, v in body.items() if v is not None},
                                              self.served.contract))
            except BadRequest as e:
                raise BadRequest(f"row {i}: {e.field}", e.expected, e.got) from None
        answers = self.served.act(requests)
        return np.asarray([a["actions"] for a in answers], dtype=np.float64)


def _load_pyfunc(data_path: str, model_config: Any = None) -> MotusPolicyPyfunc:
    """MLflow's entry point: the artifact folder of a version (its export files) -> a loaded, warmed-up policy."""
    served = ServedVersion.load(data_path)
    served.warm_up()
    return MotusPolicyPyfunc(served)
