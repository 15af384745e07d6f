"""Content addresses of pipeline steps: code + resolved config + input hashes + parent version -> one key.

A step's key is the sha256 of four things, each kept in the step's record so that a changed key can be
explained by name:
- code: the sha256 of every `motus` source file the step runs (per file, so `plan` can say which file changed),
- config: the resolved params.yaml sections the step reads, flattened to dotted keys,
- inputs: the content hashes of the tiers/features it reads (name -> hash),
- parent: the registered model version it starts from (Stage 2/3), or none.
Marin's executor derives a step's output path from its config and inputs; the code hash is what it lacks:
a fixed bug in the data code must rebuild the tiers it wrote.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]  # the installed `motus` package

# Which parts of the package each kind of step runs (directories are taken recursively).
CODE: dict[str, tuple[str, ...]] = {
    "tier": ("config.py", "data"),
    "flow": ("config.py", "data", "train/latent_action.py"),
    "latent-action": ("config.py", "data", "model", "train", "launch", "track"),
    "latent-actions": ("config.py", "data", "model/latent_action.py", "train/latent_action.py"),
    "stage": ("config.py", "data", "model", "train", "launch", "track"),
    "evaluate": ("config.py", "data", "model", "evaluate", "train/recipe.py"),
}


def code_files(kind: str, root: Path = PACKAGE) -> dict[str, str]:
    """{package-relative path: sha256} of the Python files a step of this kind runs."""
    out: dict[str, str] = {}
    for part in CODE[kind]:
        p = root / part
        files: Iterable[Path] = sorted(p.rglob("*.py")) if p.is_dir() else ([p] if p.exists() else [])
        for f in files:
            if "__pycache__" in f.parts:
                continue
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted key: leaf}; lists stay leaves (their order is part of the value)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass
class StepInputs:
    """Everything a step's result depends on."""

    code: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    parent: str | None = None

    def key(self) -> str:
        return _digest({"code": _digest(self.code), "config": self.config, "inputs": self.inputs,
                        "parent": self.parent})

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "config": self.config, "inputs": self.inputs, "parent": self.parent}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepInputs:
        return cls(dict(d.get("code") or {}), dict(d.get("config") or {}), dict(d.get("inputs") or {}),
                   d.get("parent"))


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:12] if isinstance(v, str) and len(s) == 64 else (s if len(s) <= 40 else s[:37] + "...")


def explain(old: StepInputs, new: StepInputs) -> list[str]:
    """Why two step inputs differ, by name: code files, config keys, input hashes, parent version."""
    why: list[str] = []
    files = sorted(set(old.code) | set(new.code))
    changed = [f for f in files if old.code.get(f) != new.code.get(f)]
    for f in changed[:5]:
        what = "added" if f not in old.code else "removed" if f not in new.code else "changed"
        why.append(f"code motus/{f} {what}")
    if len(changed) > 5:
        why.append(f"... and {len(changed) - 5} more code file(s)")
    for k in sorted(set(old.config) | set(new.config)):
        if old.config.get(k) != new.config.get(k):
            why.append(f"config {k}: {_short(old.config.get(k))} -> {_short(new.config.get(k))}")
    for k in sorted(set(old.inputs) | set(new.inputs)):
        if old.inputs.get(k) != new.inputs.get(k):
            why.append(f"input {k}: {_short(old.inputs.get(k) or 'none')} -> {_short(new.inputs.get(k) or 'none')}")
    if old.parent != new.parent:
        why.append(f"parent {old.parent or 'none'} -> {new.parent or 'none'}")
    return why
