"""A step of the recipe is a node of the graph (`Step`: name, kind, target, dependencies) and a kind that says
what such a step reads, runs and leaves (`StepKind`). The executor (`motus.pipeline.pipeline.Pipeline`) knows
no kind by name: it asks the kind for its config slice and code to build the content key, runs it, and asks it
whether a cached result is still there."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..errors import PipelineError
from ..keys import code_files


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    target: str  # tier name, stage key or registered model name
    deps: tuple[str, ...] = ()


class Context(Protocol):
    """What a step may use of the executor running it (`motus.pipeline.pipeline.Pipeline`)."""

    root: Path
    params: Any  # the validated params.yaml
    params_file: Path
    resolved: dict[str, Any]  # params with every default filled in: what keys read
    paths: Any  # motus.data.paths.ProjectPaths
    settings: Any  # motus.config.Settings
    tracking_uri: str
    ledger: Any  # motus.pipeline.ledger.Ledger
    evaluation: dict[str, Any]
    outputs: dict[str, dict[str, Any]]  # step name -> its output, for the steps done so far
    out_dir: Path
    nproc: int
    pipeline_run: str
    echo: Callable[[str], None]

    @property
    def registry(self) -> Any: ...

    def dep_output(self, step: Step, kind: str) -> Mapping[str, Any]: ...

    def dvc_repro(self, stage: str) -> None: ...

    def dvc_pull(self, stage: str) -> None: ...

    def model_export(self, out: Mapping[str, Any]) -> Path: ...


class StepKind:
    """What every step of one kind does. A subclass declares:

    - `kind`: its name in the graph;
    - `modules`: the motus modules it runs; its code key is their import closure (read from the source);
    - `outputs`: the keys of the record it leaves (checked when it finishes: a dependent reads them);
    - `cached`: False for steps that must be decided on the world as it is now (gates).
    """

    kind: ClassVar[str]
    modules: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()
    cached: ClassVar[bool] = True

    def code(self) -> dict[str, str]:
        return code_files(self.modules)

    def config(self, pipe: Context, step: Step) -> dict[str, Any]:
        """The resolved params.yaml sections the step reads (nested; the key flattens them)."""
        return {}

    def run(self, pipe: Context, step: Step, key: str) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self, pipe: Context, step: Step) -> tuple[str, str, dict[str, Any] | None]:
        """An uncached step (`cached = False`): (action, why, its output when already decided), deciding nothing."""
        raise NotImplementedError

    def current(self, pipe: Context, step: Step) -> dict[str, Any]:
        """An uncached step before `--from`: its output as the world has it now."""
        raise NotImplementedError

    def still_there(self, pipe: Context, step: Step, out: Mapping[str, Any], repair: bool) -> bool:
        """Do a cached record's outputs still exist? With `repair`, fetch what can be fetched (DVC pull)."""
        return False

    # -- what a finished step gives the steps that depend on it -----------------------------------------------
    def ready(self, out: Mapping[str, Any]) -> bool:
        """Whether a dependent can be keyed on this output yet (a gate without a champion: not yet)."""
        return True

    def as_input(self, out: Mapping[str, Any]) -> str | None:
        """The hash a dependent's key records under this step's name (data it reads), or None."""
        return None

    def as_parent(self, step: Step, out: Mapping[str, Any]) -> str | None:
        """The model version (`name/version`) a dependent starts from, or None."""
        return None

    def describe(self, out: Mapping[str, Any]) -> str:
        return "cached"

    def estimate(self, pipe: Context, step: Step) -> float | None:
        """Device hours the step would take, where that can be known before running it."""
        return None

    def destination(self, pipe: Context, step: Step) -> tuple[str | None, int]:
        """(cluster pool or None for this machine, devices) the step's work would hold."""
        return None, 1

    def check_outputs(self, step: Step, out: Mapping[str, Any]) -> None:
        missing = [k for k in self.outputs if k not in out]
        if missing:
            raise PipelineError(f"{step.name}: the {self.kind} step left no {', '.join(missing)} in its record")
