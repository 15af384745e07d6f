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

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..contracts import LINEAGE_FILE, ContractError, LineageRecord
from ..data.tier import export_hash  # noqa: F401 - an export's identity, called from here by the registry
from .tags import LINEAGE_TIER, T, tier_hash_keys, tiers_from_tags

# ------------------------------------------------------------------------------------------------ exports

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
        "job": _job(t),
    }


def _job(tags: dict[str, str]) -> dict[str, Any] | None:
    """The cluster job that trained the version (`motus.job.*` tags, written by the pipeline), or None."""
    job = {k[len(T + "job."):]: v for k, v in tags.items() if k.startswith(T + "job.")}
    if not job:
        return None
    for k in ("device_hours", "goodput", "lost_device_hours"):
        job[k] = _float(job.get(k))
    split = job.get("device_hours_by_pool")  # a job resubmitted to its fallback pool: the hours of each pool
    try:
        job["device_hours_by_pool"] = {str(p): float(h) for p, h in json.loads(split).items()} if split else None
    except (ValueError, AttributeError):
        job["device_hours_by_pool"] = None
    return job


# numbers of one model further apart than this are read as separate ranges, so a search never drags in much of
# a model's history just because two versions asked for at once are far apart
_RANGE_GAP = 64


def _read_versions(registry: Any, wanted: list[str]) -> dict[str, Any]:
    """The versions named `NAME/VERSION` in `wanted` (parent links), each read as its ref.

    One search per model and range of version numbers, not one read per version: MLflow filters versions by
    `name =` and by comparisons on `version_number` (it has no IN for numbers). A link the search does not
    find (no such model or version, a malformed number) is read on its own, which raises the registry's error
    naming it, as a walk one version at a time would."""
    from .registry.store import quote  # here: the registry package imports this module

    numbers: dict[str, set[int]] = {}
    for link in wanted:
        name, _, version = link.rpartition("/")
        if version.isdigit():
            numbers.setdefault(name, set()).add(int(version))
    found: dict[tuple[str, int], Any] = {}
    for name, vs in numbers.items():
        ordered = sorted(vs)
        ranges = [[ordered[0], ordered[0]]]
        for v in ordered[1:]:
            if v - ranges[-1][1] > _RANGE_GAP:
                ranges.append([v, v])
            else:
                ranges[-1][1] = v
        for lo, hi in ranges:
            for ref in registry.store.search(f"name = {quote(name)} and version_number >= {lo} "
                                             f"and version_number <= {hi}"):
                if ref.name == name and ref.version in vs:
                    found[(name, ref.version)] = ref
    out = {}
    for link in wanted:
        name, _, version = link.rpartition("/")
        ref = found.get((name, int(version))) if version.isdigit() else None
        out[link] = ref if ref is not None else registry.version(name, int(version))
    return out


def show(registry: Any, uri: str) -> dict[str, Any]:
    """The lineage of one version: its node and every ancestor's, the edges between them, totals.

    Walked breadth first, a generation at a time: the parents queued are read together (`_read_versions`), so
    a chain costs one search per model and generation, whatever the size of the store."""
    t0 = time.perf_counter()
    root = registry.resolve(uri)
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []
    read: dict[str, Any] = {}  # parent link as written in the tag -> its version
    todo: deque[Any] = deque([root])  # versions, or parent links not read yet
    lookups = 0
    while todo:
        if isinstance(todo[0], str):
            read.update(_read_versions(registry, [x for x in dict.fromkeys(todo) if isinstance(x, str)
                                                  and x not in read]))
            todo = deque(read[x] if isinstance(x, str) else x for x in todo)
        ref = todo.popleft()
        key = f"{ref.name}/{ref.version}"
        if key in nodes:
            continue
        node = nodes[key] = version_node(ref)
        for p in node["parents"]:
            edges.append({"from": key, "to": p["version"] or f"export:{p.get('export_hash', '')[:12]}",
                          "role": p["role"]})
            if p["version"]:
                lookups += 1
                todo.append(read.get(p["version"], p["version"]))
    chain = list(nodes.values())
    hours = sum(n["device_hours"] or 0.0 for n in chain)
    costs = [n["cost"] for n in chain]
    by_pool: dict[str, float] = {}
    lost = 0.0
    for n in chain:
        job = n["job"] or {}
        if job.get("pool") and job.get("device_hours") is not None:
            for pool, h in (job["device_hours_by_pool"] or {job["pool"]: job["device_hours"]}).items():
                by_pool[pool] = by_pool.get(pool, 0.0) + h
            lost += job.get("lost_device_hours") or 0.0
    return {
        "uri": uri, "root": f"{root.name}/{root.version}", "versions": chain, "edges": edges,
        "totals": {"device_hours": hours, "cost": None if any(c is None for c in costs) else sum(costs),
                   "currency": chain[0]["currency"], "versions": len(chain),
                   "cluster_device_hours_by_pool": by_pool, "cluster_lost_device_hours": lost},
        "hops": lookups, "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ uses

def uses(registry: Any, tier: str, digest: str | None = None) -> dict[str, Any]:
    """Every run that read `tier` (optionally at a hash prefix) and every version downstream of it."""
    client = registry.client
    pattern = f"{digest}%" if digest else "%"
    quoted = pattern.replace("'", "\\'")

    def runs_reading() -> list[Any]:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, f"tags.`tier.{tier}.digest` LIKE '{quoted}'",
                                  max_results=10000) if experiments else []

    # Independent reads, sent together (the answer waits for the slowest, not the sum): versions tagged with
    # the tier (server-side, so a hash prefix matches as the store's LIKE does), versions with the tier anywhere
    # in their lineage (`motus.lineage_tier.<tier>`, written at registration from the parents' tags: the
    # downstream versions in one search), and the runs that read it. A search per run and per version reached
    # took 44 s for 100 versions among 1,000 on PostgreSQL; one read of the whole store, 1.7 s.
    with ThreadPoolExecutor(5) as pool:
        tagged = [pool.submit(registry.versions, None, {key: pattern}) for key in tier_hash_keys(tier)]
        in_lineage = pool.submit(registry.versions, None, {f"{LINEAGE_TIER}{tier}": f"%,{pattern}"})
        found_runs = pool.submit(runs_reading)
        direct: dict[str, Any] = {}
        for job in tagged:
            for ref in job.result():
                direct[f"{ref.name}/{ref.version}"] = ref
        runs: dict[str, dict[str, Any]] = {}
        for r in found_runs.result():
            runs[r.info.run_id] = {"run_id": r.info.run_id, "name": r.info.run_name,
                                   "digest": r.data.tags.get(f"tier.{tier}.digest", ""), "direct": True,
                                   "stage": r.data.tags.get("stage", r.data.tags.get("job", "")), "versions": []}
        reached = {f"{ref.name}/{ref.version}": ref for ref in in_lineage.result()}
    for ref in list(direct.values()):  # versions of runs that read the tier (e.g. the VAE, which logs flow inputs)
        runs.setdefault(ref.run_id, {"run_id": ref.run_id, "name": None, "direct": True,
                                     "digest": next((t.content_hash for t in tiers_from_tags(ref.tags)
                                                     if t.name == tier), ""),
                                     "stage": ref.tags.get(f"{T}stage", ""), "versions": []})
    missing_runs = sorted(r for r in runs if r and r not in {ref.run_id for ref in direct.values()})
    for i in range(0, len(missing_runs), 100):  # versions registered from those runs (MLflow has `run_id IN`)
        ids = ", ".join(f"'{r}'" for r in missing_runs[i:i + 100])
        for ref in registry.store.search(f"run_id IN ({ids})"):
            direct.setdefault(f"{ref.name}/{ref.version}", ref)
    downstream = {**reached, **direct}
    # A version whose lineage tag holds the tier has every descendant registered since in `reached`. One
    # without (registered before lineage tags, or whose run read the tier without its version naming it):
    # its children are searched for, a few at a time; a store with many such versions is read whole instead.
    def covered(ref: Any) -> bool:
        value = ref.tags.get(f"{LINEAGE_TIER}{tier}", "")
        return bool(value) and (digest is None or f",{digest}" in value)

    frontier = [ref for ref in downstream.values() if not covered(ref)]
    if len(frontier) > UNCOVERED_WALK:
        return _uses_from_store(registry, tier, digest, runs, direct)
    todo = deque(frontier)
    while todo:
        ref = todo.popleft()
        key = f"{ref.name}/{ref.version}"
        for tag in ("parent_version", "lam_version"):
            for child in registry.versions(None, {f"{T}{tag}": key}):
                ckey = f"{child.name}/{child.version}"
                if ckey not in downstream:
                    downstream[ckey] = child
                    if not covered(child):
                        todo.append(child)
    return _uses_answer(tier, digest, runs, direct, downstream)


# found versions without the tier in their lineage tags past which `uses` reads the whole store instead
UNCOVERED_WALK = 8


def _uses_from_store(registry: Any, tier: str, digest: str | None, runs: dict[str, dict[str, Any]],
                     direct: dict[str, Any]) -> dict[str, Any]:
    """`uses` over one read of every version (a store registered before lineage tags): children in memory."""
    store = registry.store.search(None, 10000)
    by_run: dict[str, list[Any]] = {}
    children: dict[str, list[Any]] = {}
    for ref in store:  # sorted by (name, version), as the searches per run and per parent answered
        if ref.run_id:
            by_run.setdefault(ref.run_id, []).append(ref)
        for tag in ("parent_version", "lam_version"):
            if ref.tags.get(f"{T}{tag}"):
                children.setdefault(ref.tags[f"{T}{tag}"], []).append(ref)
    for run_id in list(runs):  # versions registered from those runs
        for ref in by_run.get(run_id, []) if run_id else []:
            direct.setdefault(f"{ref.name}/{ref.version}", ref)
    downstream: dict[str, Any] = {}
    todo = deque(direct.values())
    seen = set(direct)
    while todo:
        ref = todo.popleft()
        key = f"{ref.name}/{ref.version}"
        downstream[key] = ref
        for child in children.get(key, []):
            ckey = f"{child.name}/{child.version}"
            if ckey not in seen:
                seen.add(ckey)
                todo.append(child)
    return _uses_answer(tier, digest, runs, direct, downstream)


def _uses_answer(tier: str, digest: str | None, runs: dict[str, dict[str, Any]], direct: dict[str, Any],
                 downstream: dict[str, Any]) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------------ text

def tree_lines(graph: dict[str, Any], width: int = 80) -> list[str]:
    """The `show` graph as an indented tree that fits `width` columns: each version, then what made it (run,
    checkpoint, config, code, tiers by content hash), then its parents nested below it. A version reached
    twice (two children share a parent) is written once and referred to after."""
    nodes = {f"{n['model']}/{n['version']}": n for n in graph["versions"]}
    shown: set[str] = set()
    out: list[str] = []

    def fit(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "~"

    def walk(key: str, prefix: str, last: bool, role: str | None, root: bool) -> None:
        branch = "" if root else ("`-- " if last else "|-- ")
        child = "" if root else ("    " if last else "|   ")
        head = f"{role}: " if role else ""
        n = nodes.get(key)
        if n is None:
            out.append(fit(f"{prefix}{branch}{head}unregistered export {key.removeprefix('export:')}"))
            return
        hours = f"{n['device_hours'] or 0:.3g} device h"
        out.append(fit(f"{prefix}{branch}{head}{n['model']} v{n['version']}  ({n['stage']}, {hours})"))
        if key in shown:
            out.append(fit(f"{prefix}{child}`-- (as above)"))
            return
        shown.add(key)
        inner = prefix + child
        dirty = " (dirty)" if n["code_dirty"] == "true" else ""
        facts = [f"run {(n['run_id'] or '-')[:12]}  checkpoint {n['checkpoint_hash'][:12] or '-'}",
                 f"config {n['config_hash'][:12] or '-'}  code {n['code_commit'][:12] or '-'}{dirty}"]
        facts += [f"tier {t['name']} L{t['level'] if t['level'] is not None else '?'} {t['content_hash'][:12]}"
                  for t in n["tiers"]]
        facts += [f"feature {name} {h[:12]}" for name, h in sorted(n["features"].items())]
        if job := n.get("job"):
            gp = f", goodput {job['goodput']:.0%}" if job.get("goodput") is not None else ""
            facts.append(f"job {job.get('namespace')}/{job.get('name')} on {job.get('pool')} "
                         f"({job.get('nodes')} x {job.get('gpus_per_node')} GPU){gp}")
        parents = [e for e in graph["edges"] if e["from"] == key]
        if not parents:
            facts.append("from the pretrained bases")
        for i, f in enumerate(facts):
            end = i == len(facts) - 1 and not parents
            out.append(fit(f"{inner}{'`-- ' if end else '|-- '}{f}"))
        for i, e in enumerate(parents):
            walk(e["to"], inner, i == len(parents) - 1, e["role"], False)

    walk(graph["root"], "", True, None, True)
    tot = graph["totals"]
    cost = "unknown" if tot["cost"] is None else f"{tot['cost']:.4g} {tot['currency']}"
    out.append(fit(f"total: {tot['device_hours']:.4g} device hours, cost {cost}, {tot['versions']} versions"))
    if tot.get("cluster_device_hours_by_pool"):
        pools = ", ".join(f"{p} {h:.4g}" for p, h in sorted(tot["cluster_device_hours_by_pool"].items()))
        out.append(fit(f"cluster jobs: {pools} device h by pool, {tot['cluster_lost_device_hours']:.4g} lost"))
    return out


# ------------------------------------------------------------------------------------------------ picture

def layout(graph: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], dict[str, str], list[tuple[str, str, str]]]:
    """Where each box of the picture goes, left to right: tiers, features, then versions from the oldest
    ancestor to the version asked about. Returns (box -> (column, row), box -> label, edges (from, to, role)),
    every box in its own (column, row) cell, so nothing overlaps."""
    nodes = {f"{n['model']}/{n['version']}": n for n in graph["versions"]}
    depth: dict[str, int] = {graph["root"]: 0}
    for e in graph["edges"]:  # edges are in walk order: a parent's depth follows its child's
        depth[e["to"]] = max(depth.get(e["to"], 0), depth[e["from"]] + 1)
    far = max(depth.values(), default=0)
    column: dict[str, int] = {}
    labels: dict[str, str] = {}
    edges: list[tuple[str, str, str]] = []
    for key, d in depth.items():
        column[key] = 2 + far - d
        n = nodes.get(key)
        labels[key] = (f"{n['model']} v{n['version']}\n{n['stage']}, {(n['device_hours'] or 0):.3g} device h"
                       if n else f"unregistered export\n{key.removeprefix('export:')[:12]}")
    for e in graph["edges"]:
        edges.append((e["to"], e["from"], e["role"]))  # drawn from the input to what it made
    for key, n in nodes.items():
        for t in n["tiers"]:
            tk = f"tier:{t['name']}@{t['content_hash'][:12]}"
            column[tk], labels[tk] = 0, f"tier {t['name']}\nL{t['level']} {t['content_hash'][:12]}"
            edges.append((tk, key, "read"))
        for name, h in n["features"].items():
            fk = f"feature:{name}@{h[:12]}"
            column[fk], labels[fk] = 1, f"feature {name}\n{h[:12]}"
            edges.append((fk, key, "read"))
    rows: dict[int, int] = {}
    where = {}
    for key in sorted(column, key=lambda k: (column[k], k)):
        where[key] = (column[key], rows.get(column[key], 0))
        rows[column[key]] = rows.get(column[key], 0) + 1
    return where, labels, edges


def _draw(graph: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    where, labels, edges = layout(graph)
    cols = max(c for c, _ in where.values()) + 1
    tall = max(r for _, r in where.values()) + 1
    fig = Figure(figsize=(3.0 * cols + 0.5, 0.75 * tall + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(tall - 0.5, -0.5)
    ax.axis("off")
    colours = {0: "#fdf1dc", 1: "#e8f4e8"}
    boxes = {}
    for key, (c, r) in where.items():
        face = "#dff5df" if key == graph["root"] else colours.get(c, "#eef3fb")
        boxes[key] = ax.text(c, r, labels[key], ha="center", va="center", fontsize=7, family="monospace", zorder=3,
                             bbox={"boxstyle": "round", "facecolor": face, "edgecolor": "#999"})
    for src, dst, role in edges:
        (x0, y0), (x1, y1) = where[src], where[dst]
        # arrows run under the boxes (zorder), from the right edge of the input to the left edge of what it made
        ax.annotate("", xy=(x1 - 0.3, y1), xytext=(x0 + 0.3, y0), zorder=1,
                    arrowprops={"arrowstyle": "->", "color": "#999" if role == "read" else "#335", "lw": 0.8})
    tot = graph["totals"]
    cost = "unknown" if tot["cost"] is None else f"{tot['cost']:.4g} {tot['currency']}"
    ax.set_title(f"lineage of {graph['root']}: {tot['device_hours']:.4g} device hours, cost {cost}", fontsize=9)
    fig.tight_layout()
    return fig, boxes


def plot(graph: dict[str, Any], path: Path) -> Path:
    """The `show` graph as a PNG, laid out left to right (see `layout`): tiers and features on the left, then
    every version after its parents; arrows go from what was read to what it made."""
    fig, _ = _draw(graph)
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
