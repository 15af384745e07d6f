"""The code a pipeline step runs is read from the imports, not kept by hand."""

from __future__ import annotations

from pathlib import Path

from motus.pipeline.keys import module_closure
from motus.pipeline.steps import KINDS


def test_each_kind_of_step_runs_what_its_entry_imports():
    tier, evaluate, stage = (KINDS[k].code() for k in ("tier", "evaluate", "stage"))
    # sources named as "module:function" strings by the ingest registry are code the tier step runs
    assert {"config.py", "data/ingest.py", "sim/aloha.py", "data/sources/lerobot.py"} <= set(tier)
    assert not any(p.startswith(("model/", "train/", "track/", "evaluate/")) for p in tier)
    # the evaluation builds its inputs with train/inputs.py; it never runs the stage recipe
    assert "train/inputs.py" in evaluate and "train/recipe.py" not in evaluate
    assert {"train/stage.py", "train/trainer.py", "model/video_expert.py", "launch/worker.py", "contracts.py"} <= set(stage)
    assert "pipeline/pipeline.py" not in stage and "cli/__init__.py" not in stage
    assert all(len(h) == 64 for h in stage.values())


def test_closure_follows_lazy_imports_and_references_but_not_a_parents_lazy_names(tmp_path: Path):
    root = tmp_path / "motus"
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import g\n    return g\n",       # a lazy import is still code
        "b.py": "REF = 'motus.c:h'\n",                                     # a registry reference
        "c.py": "",
        "pkg/__init__.py": "def __getattr__(n):\n    from motus.pkg import heavy\n",  # lazy name of a package
        "pkg/light.py": "",
        "pkg/heavy.py": "",
        "d.py": "from .pkg import light\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    got = {p.relative_to(root).as_posix() for p in module_closure(("motus.a",), root)}
    assert got == {"__init__.py", "a.py", "b.py", "c.py"}
    got = {p.relative_to(root).as_posix() for p in module_closure(("motus.d",), root)}
    assert got == {"__init__.py", "d.py", "pkg/__init__.py", "pkg/light.py"}  # importing light runs pkg's
    # __init__, whose lazy `heavy` is not run by it


def test_every_kind_of_step_is_a_class_the_executor_does_not_name():
    """The executor dispatches on the kind's class, never on its name: every kind of the recipe's graph has a
    step class declaring its code, and no kind string appears in the executor."""
    import yaml

    from motus.config import validate_params
    from motus.pipeline import build_steps
    from motus.pipeline.steps import StepKind

    params = validate_params(yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text()))
    kinds = {s.kind for s in build_steps(params)}
    assert kinds == set(KINDS)
    for name, kind in KINDS.items():
        assert isinstance(kind, StepKind) and kind.kind == name
        assert kind.modules or not kind.cached, f"{name}: a cached step must declare the code it runs"
    executor = (Path(__file__).resolve().parents[2] / "motus" / "pipeline" / "pipeline.py").read_text()
    named = [k for k in KINDS if f'"{k}"' in executor]
    assert named == [], f"the executor names step kinds {named}; a kind's behaviour belongs in its step class"
