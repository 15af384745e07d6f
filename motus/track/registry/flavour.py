"""Every registered policy is an MLflow model: `MLmodel` (the `python_function` flavour, loaded by
`motus.serve.pyfunc`, with a signature read from the export's serving contract), `python_env.yaml` and
`requirements.txt`, written beside the export's files in the version's artifact folder. So
`mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` / MLServer / KServe load what the
gate passed, with no copy of the weights: the packaging files are the only additions, and the export hash
(what lineage and `fetch` check) is of the export's own files, without them.

Only the module's name is written here (a string): the registry does not import the serving room.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PYFUNC_LOADER = "motus.serve.pyfunc"


def _pin(dist: str) -> str:
    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return dist


def signature(contract: Any) -> Any:
    """The pyfunc signature of a serving contract: a batch of observations of the trained view (one action
    space per call, `tier` param) -> action chunks in the robot's units; for a video model (Stage 1), images and
    instructions -> the predicted future frames."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    sizes = {s.image_size for s in contract.spaces}
    h, w = sizes.pop() if len(sizes) == 1 else (-1, -1)
    tier = contract.spaces[0].tier if len(contract.spaces) == 1 else ""
    image = TensorSpec(np.dtype(np.uint8), (-1, h, w, 3), "image")
    instruction = TensorSpec(np.dtype(str), (-1,), "instruction")
    common = [ParamSpec("tier", "string", tier), ParamSpec("seed", "long", -1), ParamSpec("steps", "long", 0)]
    if not contract.is_policy:  # a video model: observation + language -> the future frames
        frames = TensorSpec(np.dtype(np.uint8), (-1, -1, h, w, 3), "frames")
        return ModelSignature(inputs=Schema([image, instruction]), outputs=Schema([frames]),
                              params=ParamSchema([ParamSpec("mode", "string", "vgm"), *common]))
    states = {s.state_dim for s in contract.spaces}
    actions = {s.action_dim for s in contract.spaces}
    state_dim = states.pop() if len(states) == 1 else -1
    action_dim = actions.pop() if len(actions) == 1 else -1
    inputs = Schema([image, TensorSpec(np.dtype(np.float32), (-1, state_dim), "state"), instruction])
    outputs = Schema([TensorSpec(np.dtype(np.float64), (-1, contract.chunk, action_dim), "actions")])
    params = ParamSchema([ParamSpec("mode", "string", "vla"),  # vla | joint
                          *common])  # seed >= 0: row i's noise is seeded with seed + i; steps 0: the model's
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def write_pyfunc_files(export: Path, dst: Path, *, run_id: str | None, export_hash: str) -> list[Path]:
    """Write MLmodel, python_env.yaml and requirements.txt for the export into `dst`; [] when the export has no
    serving contract (Stage 2 and latent-action exports, whose outputs are in no robot's units, stay folders)."""
    from mlflow.models import Model

    from ...contracts import LINEAGE_FILE, SERVING_FILE, ServingContract

    if not ServingContract.exists(export):
        return []
    contract = ServingContract.read(export)
    dst.mkdir(parents=True, exist_ok=True)
    python = platform.python_version()
    requirements = [_pin(d) for d in ("motus", "torch", "mlflow", "numpy", "safetensors", "diffusers",
                                      "transformers")]
    (dst / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (dst / "python_env.yaml").write_text(f"python: {python}\nbuild_dependencies:\n- pip\ndependencies:\n"
                                         "- -r requirements.txt\n")
    model = Model(run_id=run_id, signature=signature(contract))
    model.add_flavor("python_function", loader_module=PYFUNC_LOADER, data=".", python_version=python,
                     env={"virtualenv": "python_env.yaml"})
    model.add_flavor("motus", serving=SERVING_FILE, lineage=LINEAGE_FILE, export_hash=export_hash,
                     registered_model=contract.registered_model, modes=list(contract.modes))
    model.save(str(dst / "MLmodel"))
    return [dst / "MLmodel", dst / "python_env.yaml", dst / "requirements.txt"]
