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

import ast
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]  # the installed `motus` package

# The module each kind of step runs; what it runs is that module and everything it imports, found by reading
# the imports (module-level and inside functions: a lazy import is still code the step may run).
# Registries that name a module as "motus.pkg.module:function" (the ingest step's source kinds) count as imports.
ENTRY: dict[str, tuple[str, ...]] = {
    "tier": ("motus.config", "motus.data.ingest", "motus.data.versioning"),
    "flow": ("motus.config", "motus.data.latent_actions"),
    "latent-action": ("motus.launch.worker", "motus.train.latent_action"),
    "latent-actions": ("motus.config", "motus.data.latent_actions"),
    "stage": ("motus.launch.worker", "motus.train.stage"),
    "evaluate": ("motus.evaluate.run", "motus.track.evaluations"),
}


_REFERENCE = re.compile(r"^motus(\.\w+)+:\w+$")


def _module_file(module: str, root: Path) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(path: Path, module: str, root: Path, top_level_only: bool = False) -> set[str]:
    """The motus modules a file imports, anywhere in it (or, `top_level_only`, what importing it runs);
    `from .pkg import name` counts `pkg.name` when that is a module, else `pkg`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _module_file(sub, root) else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _REFERENCE.match(node.value):
            found.add(node.value.split(":")[0])
    return {m for m in found if m == "motus" or m.startswith("motus.")}


def module_closure(entries: tuple[str, ...], root: Path = PACKAGE) -> list[Path]:
    """Every file of the package that `entries` import, transitively, with the packages around them (a
    package's `__init__` reached only as a parent contributes what importing it runs, not its lazy names)."""
    seen: dict[str, Path] = {}
    parents: set[str] = set()
    todo = [(m, False) for m in entries]
    while todo:
        module, as_parent = todo.pop()
        if module in seen and (as_parent or module not in parents):
            continue
        path = _module_file(module, root) if module != "motus" else root / "__init__.py"
        if path is None:
            continue
        seen[module] = path
        if as_parent:
            parents.add(module)
        else:
            parents.discard(module)
        parent = module.rpartition(".")[0]
        todo += [(parent, True)] if parent and parent not in seen else []
        todo += [(m, False) for m in sorted(_imports_of(path, module, root, top_level_only=as_parent))
                 if m not in seen or m in parents]
    return sorted(set(seen.values()))


def code_files(kind: str, root: Path = PACKAGE) -> dict[str, str]:
    """{package-relative path: sha256} of the Python files a step of this kind runs (see `ENTRY`)."""
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in module_closure(ENTRY[kind], root)}


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
