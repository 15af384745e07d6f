"""The house: rooms import only from rooms to their left (DESIGN.md), no module cycles, records read only by
their owners, and the library pins what it drives. Read from the source, so it holds for lazy imports too."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MOTUS = REPO / "motus"
ORDER = ["contracts", "config", "model", "sim", "data", "train", "evaluate", "track", "launch", "pipeline", "serve",
         "cli"]
RANK = {r: i for i, r in enumerate(ORDER)}
FREE = {"__init__", "__main__", "demo"}  # the package itself and the demo entry point sit above every room


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module -> every motus/flows module it imports, anywhere in its body (`from . import x` resolved)."""
    modules = {_module(p): p for p in MOTUS.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # `from .pkg import module` imports the module
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[name] = {m for m in found if m.split(".")[0] in ("motus", "flows")}
    return out


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_rooms_import_only_to_their_left():
    bad = []
    for mod, targets in _imports().items():
        src = _room(mod)
        assert src in RANK or src in FREE or src is None, f"{mod}: not a room of DESIGN.md ({ORDER})"
        for t in targets:
            if t.split(".")[0] == "flows":
                bad.append(f"{mod} imports {t} (flows sit above the library; start them by entrypoint)")
            elif src in RANK and _room(t) in RANK and RANK[_room(t)] > RANK[src]:
                bad.append(f"{mod}: {src} -> {_room(t)} ({t})")
    assert bad == [], "imports against the room order:\n" + "\n".join(sorted(bad))


def test_no_module_import_cycles():
    imports = _imports()
    graph = {m: {t for t in ts if t in imports} for m, ts in imports.items()}
    graph = {m: {t for t in ts if not m.startswith(t + ".") and t != m} for m, ts in graph.items()}  # parents

    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its modules is not a cycle of the code
    cycles = [c for c in cycles if not any(part.count(".") == 1 and part + "." in c for part in c.split(" -> "))]
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_lineage_records_are_read_only_by_their_owner():
    """The file name appears only in the contract that owns it; nothing else parses it as a dict."""
    hits = subprocess.run(["grep", "-rn", "lineage.json", str(MOTUS)], capture_output=True, text=True).stdout
    owners = {MOTUS / "contracts.py"}
    strays = [line for line in hits.splitlines() if Path(line.split(":", 1)[0]) not in owners]
    assert strays == [], "\n".join(strays)


def test_manifests_are_read_as_types():
    """Tier, feature and checkpoint manifests are parsed by the types that own them (contracts.py,
    train/checkpoint.py); everything else reads attributes, never `manifest["key"]` of a raw dict."""
    hits = subprocess.run(["grep", "-rnE", r"manifest(\[|\.get\()", str(MOTUS)], capture_output=True,
                          text=True).stdout
    owners = {MOTUS / "contracts.py", MOTUS / "train" / "checkpoint.py"}
    strays = [line for line in hits.splitlines() if Path(line.split(":", 1)[0]) not in owners]
    assert strays == [], "\n".join(strays)


def test_diffusers_is_pinned_to_the_tested_minor_range():
    """video_expert.py drives Wan internals; an unbounded range would let an upgrade change them silently."""
    text = (REPO / "pyproject.toml").read_text()
    spec = re.search(r'"diffusers([^"]*)"', text).group(1)
    assert ">=" in spec and "<" in spec.replace("<=", ""), f"diffusers{spec}: needs an upper bound"


WAN_PATHS = ["rope", "patch_embedding.weight", "condition_embedder.text_embedder",
             "condition_embedder.timesteps_proj", "condition_embedder.time_embedder", "condition_embedder.time_proj",
             "condition_embedder.act_fn", "scale_shift_table", "norm_out", "proj_out", "blocks.0.scale_shift_table",
             "blocks.0.norm1", "blocks.0.norm2", "blocks.0.norm3", "blocks.0.attn1.norm_q", "blocks.0.attn1.norm_k",
             "blocks.0.attn1.to_q", "blocks.0.attn1.to_k", "blocks.0.attn1.to_v", "blocks.0.attn1.to_out",
             "blocks.0.attn2", "blocks.0.ffn"]


def test_the_wan_internals_the_video_expert_drives_exist():
    """Every attribute `video_expert.py` reaches into, on a real (tiny) Wan transformer of the installed diffusers:
    an upgrade that renames one fails here, by name, instead of deep inside a training step."""
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1)
    missing = []
    for path in WAN_PATHS:
        obj = wan
        for part in path.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
            if obj is None:
                missing.append(path)
                break
    assert missing == [], f"diffusers' WanTransformer3DModel lacks {missing}: motus/model/video_expert.py breaks"
    source = (MOTUS / "model" / "video_expert.py").read_text()
    for path in WAN_PATHS:  # the list is the one the code uses: each leaf name appears in it
        assert path.split(".")[-1] in source, path
