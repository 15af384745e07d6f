"""Lineage queries over the registry: what made a version, and what a tier went into.

Both directions are graph walks over facts recorded at registration (version tags `motus.*`, see
`motus.track.registry`), never over file paths that may have moved:

  show   version -> run -> checkpoint hash -> config hash + code commit -> tiers (name, level, hash)
         -> parent version (the export the job started from, matched by content hash) and, for Stage 2, the
         latent-action model behind its features -> ... until versions with no parent (pretrained bases).
  uses   tier[@hash] -> every run that read it (run tag `tier.<name>.digest`, set by the tracker) and every
         version registered from such a run -> every version downstream of those (children by
         `motus.parent_version` / `motus.lam_version`), with their runs and checkpoints.

A tier hash matches either hash a tier has (its content hash, or its DVC hash where versioned), by prefix;
the tiers of a version print with their content hash (see `motus.contracts`).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

from ..contracts import LINEAGE_FILE, ContractError, LineageRecord
from ..data.tier import folder_hash
from .tags import T, tier_hash_keys, tiers_from_tags

# ------------------------------------------------------------------------------------------------ exports

def export_hash(folder: Path) -> str:
    """The identity of an export's content: `folder_hash`, the same definition as the latent-action feature's
    `latent_action_model_hash`, so Stage 2 links to the VAE."""
    return folder_hash(folder)


def read_export_lineage(path: Path) -> tuple[Path, LineageRecord]:
    """(export folder, its lineage record) for an export folder or a run folder holding `export/`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such export or run folder: {path}")
    export = path / "export" if LineageRecord.exists(path / "export") else path
    if not LineageRecord.exists(export):
        raise ContractError(f"{path} is not a stage export: {export / LINEAGE_FILE} is missing (a finished "
                            "`motus train` or `motus latent-action train` writes it into <run_dir>/export)")
    return export.resolve(), LineageRecord.read(export)


def locate(recorded: str, export: Path) -> Path | None:
    """A path recorded by a job (absolute, or relative to the job's working folder) as it exists here.

    A relative path is tried from the current folder and from each folder above the export (the job's
    working folder is one of them: `<cwd>/<run_dir>/export`).
    """
    p = Path(recorded)
    if p.is_absolute():
        return p if p.exists() else None
    for base in (Path.cwd(), *Path(export).resolve().parents):
        if (base / p).exists():
            return (base / p).resolve()
    return None


# ------------------------------------------------------------------------------------------------ show

def _tiers(tags: dict[str, str]) -> list[dict[str, Any]]:
    return [t.to_json() for t in tiers_from_tags(tags)]


def _float(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def version_node(ref: Any) -> dict[str, Any]:
    """Everything lineage knows about one version, from its tags."""
    t = dict(ref.tags)
    parents = []
    if t.get(f"{T}parent_version"):
        parents.append({"role": "init-from", "version": t[f"{T}parent_version"]})
    elif t.get(f"{T}parent_path"):
        parents.append({"role": "init-from", "version": None, "unregistered_export": t[f"{T}parent_path"],
                        "export_hash": t.get(f"{T}parent_hash", "")})
    if t.get(f"{T}lam_version"):
        parents.append({"role": "latent-actions", "version": t[f"{T}lam_version"]})
    elif t.get(f"{T}lam_hash"):
        parents.append({"role": "latent-actions", "version": None, "export_hash": t[f"{T}lam_hash"]})
    return {
        "model": ref.name, "version": ref.version, "uri": ref.uri, "stage": t.get(f"{T}stage", ""),
        "run_id": ref.run_id, "checkpoint_hash": t.get(f"{T}checkpoint_hash", ""),
        "checkpoint_path": t.get(f"{T}checkpoint_path", ""), "config_hash": t.get(f"{T}config_hash", ""),
        "code_commit": t.get(f"{T}code_commit", ""), "code_dirty": t.get(f"{T}code_dirty", ""),
        "export_hash": t.get(f"{T}export_hash", ""), "tiers": _tiers(t),
        "features": {k[len(T + "feature."):]: v for k, v in t.items() if k.startswith(T + "feature.")},
        "parents": parents, "pretrained_bases": not parents,
        "device_hours": _float(t.get(f"{T}device_hours")), "cost": _float(t.get(f"{T}cost")),
        "device_hours_total": _float(t.get(f"{T}device_hours_total")), "cost_total": _float(t.get(f"{T}cost_total")),
        "currency": t.get(f"{T}currency", ""),
    }


def show(registry: Any, uri: str) -> dict[str, Any]:
    """The lineage of one version: its node and every ancestor's, the edges between them, totals."""
    t0 = time.perf_counter()
    root = registry.resolve(uri)
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []
    todo = deque([root])
    lookups = 0
    while todo:
        ref = todo.popleft()
        key = f"{ref.name}/{ref.version}"
        if key in nodes:
            continue
        node = nodes[key] = version_node(ref)
        for p in node["parents"]:
            edges.append({"from": key, "to": p["version"] or f"export:{p.get('export_hash', '')[:12]}",
                          "role": p["role"]})
            if p["version"]:
                name, _, version = p["version"].rpartition("/")
                lookups += 1
                todo.append(registry.version(name, int(version)))
    chain = list(nodes.values())
    hours = sum(n["device_hours"] or 0.0 for n in chain)
    costs = [n["cost"] for n in chain]
    return {
        "uri": uri, "root": f"{root.name}/{root.version}", "versions": chain, "edges": edges,
        "totals": {"device_hours": hours, "cost": None if any(c is None for c in costs) else sum(costs),
                   "currency": chain[0]["currency"], "versions": len(chain)},
        "hops": lookups, "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ uses

def uses(registry: Any, tier: str, digest: str | None = None) -> dict[str, Any]:
    """Every run that read `tier` (optionally at a hash prefix) and every version downstream of it."""
    client = registry.client
    pattern = f"{digest}%" if digest else "%"
    direct: dict[str, Any] = {}
    for key in tier_hash_keys(tier):
        for ref in registry.versions(None, {key: pattern}):
            direct[f"{ref.name}/{ref.version}"] = ref
    runs: dict[str, dict[str, Any]] = {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiments:
        quoted = pattern.replace("'", "\\'")
        found = client.search_runs(experiments, f"tags.`tier.{tier}.digest` LIKE '{quoted}'", max_results=10000)
        for r in found:
            runs[r.info.run_id] = {"run_id": r.info.run_id, "name": r.info.run_name,
                                   "digest": r.data.tags.get(f"tier.{tier}.digest", ""), "direct": True,
                                   "stage": r.data.tags.get("stage", r.data.tags.get("job", "")), "versions": []}
    for ref in list(direct.values()):  # versions of runs that read the tier (e.g. the VAE, which logs flow inputs)
        runs.setdefault(ref.run_id, {"run_id": ref.run_id, "name": None, "direct": True,
                                     "digest": next((t.content_hash for t in tiers_from_tags(ref.tags)
                                                     if t.name == tier), ""),
                                     "stage": ref.tags.get(f"{T}stage", ""), "versions": []})
    for run_id in list(runs):  # versions registered from those runs
        for ref in registry.versions(run_id=run_id):
            direct.setdefault(f"{ref.name}/{ref.version}", ref)
    downstream: dict[str, Any] = {}
    todo = deque(direct.values())
    seen = set(direct)
    while todo:
        ref = todo.popleft()
        key = f"{ref.name}/{ref.version}"
        downstream[key] = ref
        for tag in ("parent_version", "lam_version"):
            for child in registry.versions(None, {f"{T}{tag}": key}):
                ckey = f"{child.name}/{child.version}"
                if ckey not in seen:
                    seen.add(ckey)
                    todo.append(child)
    versions = []
    for key, ref in sorted(downstream.items()):
        node = version_node(ref)
        node["direct"] = key in direct
        versions.append(node)
        run = runs.setdefault(ref.run_id, {"run_id": ref.run_id, "name": None, "direct": False, "digest": "",
                                           "stage": node["stage"], "versions": []})
        run["versions"].append(key)
    checkpoints = sorted({(v["checkpoint_hash"], v["checkpoint_path"], v["uri"]) for v in versions
                          if v["checkpoint_hash"]})
    return {"tier": tier, "digest": digest, "runs": sorted(runs.values(), key=lambda r: (not r["direct"], r["run_id"])),
            "versions": versions,
            "checkpoints": [{"hash": h, "path": p, "version": u} for h, p, u in checkpoints]}


# ------------------------------------------------------------------------------------------------ picture

def plot(graph: dict[str, Any], path: Path) -> Path:
    """The `show` graph as a PNG: one box per version (stage, run, hashes, tiers), arrows to parents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nodes = {f"{n['model']}/{n['version']}": n for n in graph["versions"]}
    depth: dict[str, int] = {graph["root"]: 0}
    for e in graph["edges"]:  # edges are in walk order, so a parent's depth follows its child's
        if e["to"] not in depth:
            depth[e["to"]] = depth[e["from"]] + 1
    columns: dict[int, list[str]] = {}
    for k, d in depth.items():
        columns.setdefault(d, []).append(k)
    width = max(len(columns), 1)
    tall = max((len(v) for v in columns.values()), default=1)
    fig = Figure(figsize=(4.2 * width + 1, 2.6 * tall + 1), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(-0.5, tall - 0.5)
    ax.axis("off")
    where = {}
    for d, keys in columns.items():
        for i, k in enumerate(sorted(keys)):
            x, y = width - 1 - d, tall - 1 - i - (tall - len(keys)) / 2
            where[k] = (x, y)
            n = nodes.get(k)
            if n is None:
                text = f"unregistered export\n{k}"
            else:
                tiers = ", ".join(f"{t['name']} L{t['level']} {t['content_hash'][:8]}" for t in n["tiers"][:4])
                text = (f"{k}  ({n['stage']})\nrun {str(n['run_id'])[:12]}  ckpt {n['checkpoint_hash'][:10]}\n"
                        f"config {n['config_hash'][:10]}  code {n['code_commit'][:10]}\n{tiers}\n"
                        f"{(n['device_hours'] or 0):.4g} device h" + ("\npretrained bases" if n["pretrained_bases"] else ""))
            ax.text(x, y, text, ha="center", va="center", fontsize=7, family="monospace",
                    bbox={"boxstyle": "round", "facecolor": "#eef3fb" if k != graph["root"] else "#dff5df"})
    for e in graph["edges"]:
        (x0, y0), (x1, y1) = where[e["from"]], where[e["to"]]
        ax.annotate("", xy=(x1 + 0.32, y1), xytext=(x0 - 0.32, y0),
                    arrowprops={"arrowstyle": "->", "color": "#555"})
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.08, e["role"], fontsize=7, ha="center", color="#555")
    tot = graph["totals"]
    cost = "unknown" if tot["cost"] is None else f"{tot['cost']:.4g} {tot['currency']}"
    ax.set_title(f"lineage of {graph['root']}: {tot['device_hours']:.4g} device hours, cost {cost}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def attach_picture(registry: Any, graph: dict[str, Any], local: Path | None = None) -> str:
    """Plot the graph and log it to the root version's run as `lineage/<model>-v<version>.png`; returns the path."""
    import tempfile

    root = registry.resolve(f"models:/{graph['root'].rsplit('/', 1)[0]}/{graph['root'].rsplit('/', 1)[1]}")
    name = f"{root.name}-v{root.version}.png"
    with tempfile.TemporaryDirectory() as tmp:
        png = plot(graph, Path(tmp) / name)
        if local is not None:
            Path(local).parent.mkdir(parents=True, exist_ok=True)
            Path(local).write_bytes(png.read_bytes())
        if root.run_id:
            registry.client.log_artifact(root.run_id, str(png), "lineage")
            registry.client.set_model_version_tag(root.name, str(root.version), f"{T}lineage_image",
                                                  f"lineage/{name}")
    return f"lineage/{name}"
