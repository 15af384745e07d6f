"""`motus registry ...` (versions, gates, champion, audit) and `motus lineage ...` (both directions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..contracts import mask_secrets

registry_app = typer.Typer(no_args_is_help=True, help="Registered models: register, evaluate gates, promote, roll back.")
lineage_app = typer.Typer(no_args_is_help=True, help="What made a model, and what a data tier went into.")

UriOption = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow store (default: MOTUS_TRACKING_URI).")]
ParamsOption = Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml (gates, costs).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _registry(tracking_uri: str | None, params: Path | None):
    from ..config import ConfigError, get_settings, load_params
    from ..track.registry import Registry

    try:
        settings = get_settings()
        p = load_params(params or settings.params_file)
        return Registry(tracking_uri or settings.tracking_uri, p)
    except ConfigError as e:
        raise _fail(str(e)) from None


def _run(fn, *args: Any, **kwargs: Any) -> Any:
    """Call into the library; its known errors become `error: ...` and exit 1."""
    from mlflow.exceptions import MlflowException

    from ..track.gates import GateError
    from ..track.registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except (RegistryError, GateError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    except MlflowException as e:
        raise _fail(f"MLflow: {e.message}") from None


def _console():
    from rich.console import Console

    return Console()


# --------------------------------------------------------------------------------------------- registry

@registry_app.command("list")
def list_models(model: Annotated[str | None, typer.Argument(help="Show this model's versions.")] = None,
                tracking_uri: UriOption = None, params: ParamsOption = None, as_json: JsonOption = False) -> None:
    """Registered models with their champion and candidate, or one model's versions and verdicts. An alias moved
    outside the platform (not what the audit trail says) is flagged UNVERIFIED."""
    from rich.table import Table

    reg = _registry(tracking_uri, params)
    if model is None:
        rows = []
        for rm in _run(reg.models):
            aliases = {a: int(v) for a, v in (rm.aliases or {}).items()}
            latest = max((int(v.version) for v in rm.latest_versions or []), default=None)
            bad = [s for s in _run(reg.alias_states, rm.name) if not s.verified]
            rows.append({"model": rm.name, "latest": latest, **{a: aliases.get(a) for a in ("champion", "candidate")},
                         "unverified": [s.describe() for s in bad]})
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table("model", "latest", "champion", "candidate", "audit",
                      title=f"registry {mask_secrets(reg.tracking_uri)}")
        for r in rows:
            table.add_row(r["model"], *(f"v{r[k]}" if r[k] is not None else "-" for k in ("latest", "champion", "candidate")),
                          "\n".join(f"[red]{d}[/red]" for d in r["unverified"]) or "ok")
        _console().print(table)
        return
    refs = _run(reg.versions, model)
    aliases = _run(reg.aliases, model)
    bad = [s for s in _run(reg.alias_states, model) if not s.verified]
    unverified = {s.alias for s in bad}
    by_version: dict[int, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(v, []).append(a)
    from ..pipeline.report import model_numbers

    rows = [{"version": r.version, "aliases": sorted(by_version.get(r.version, [])),
             "unverified_aliases": sorted(set(by_version.get(r.version, [])) & unverified),
             "stage": r.tags.get("motus.stage"),
             "verdict": r.tags.get("motus.verdict", ""), "run_id": r.run_id,
             "device_hours_total": r.tags.get("motus.device_hours_total"), "cost_total": r.tags.get("motus.cost_total"),
             "metrics": _version_metrics(reg, r)}
            for r in refs]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        _say_unverified(model, bad, err=True)  # stdout stays one JSON document
        return
    table = Table("version", "aliases", "stage", "verdict", "run", "device h (total)", "cost (total)",
                  "own numbers (held out)", title=model)
    for r in rows:
        shown = [f"[red]{a} (UNVERIFIED)[/red]" if a in unverified else a for a in r["aliases"]]
        table.add_row(f"v{r['version']}", ", ".join(shown), r["stage"] or "", r["verdict"] or "-",
                      (r["run_id"] or "")[:12], r["device_hours_total"] or "", r["cost_total"] or "",
                      model_numbers(r["metrics"]))
    _console().print(table)
    _say_unverified(model, bad)


def _say_unverified(model: str, states: list[Any], err: bool = False) -> None:
    """One line per alias that disagrees with the audit trail, and the fix."""
    for s in states:
        typer.echo(f"{model}: {s.describe()}", err=err)
    if states:
        typer.echo(f"  gates and pipelines refuse it; `motus registry verify {model} --repair` restores the "
                   "audited state", err=err)


def _version_metrics(reg: Any, ref: Any) -> dict[str, float]:
    """The version's held-out and evaluation numbers (what `registry list` shows beside floors and ceiling)."""
    try:
        m = reg.metrics(ref)
    except Exception:  # noqa: BLE001 - a listing shows what it can; a missing run is said by `registry evaluate`
        return {}
    return {k: v for k, v in m.items() if k.startswith(("val/", "eval/", "lam/"))}


@registry_app.command()
def register(path: Annotated[Path, typer.Argument(help="A run folder or its export/ folder.")],
             tracking_uri: UriOption = None, params: ParamsOption = None, as_json: JsonOption = False) -> None:
    """Register a finished job's export as a new version (alias `candidate`); idempotent."""
    reg = _registry(tracking_uri, params)
    ref = _run(reg.register, path)
    if as_json:
        typer.echo(json.dumps({"name": ref.name, "version": ref.version, "run_id": ref.run_id, "source": ref.source,
                               "tags": dict(ref.tags)}, indent=2))
        return
    t = ref.tags
    typer.echo(f"{ref.name} v{ref.version} (candidate): run {ref.run_id}, stage {t.get('motus.stage')}, "
               f"parent {t.get('motus.parent_version') or '-'}, {t.get('motus.device_hours_total')} device h total")


@registry_app.command()
def evaluate(model: str, version: str, tracking_uri: UriOption = None, params: ParamsOption = None,
             as_json: JsonOption = False) -> None:
    """Judge a version against its gate and the champion; record the verdict (exit 1 when it fails)."""
    from rich.table import Table

    reg = _registry(tracking_uri, params)
    v = _run(reg.evaluate, model, version)
    if as_json:
        typer.echo(v.to_json())
    else:
        champ = f"v{v.champion_version}" if v.champion_version is not None else "none"
        table = Table("rule", "value", "champion", "result", "reason",
                      title=f"{model} v{v.version}: {'PASS' if v.passed else 'FAIL'} (champion {champ})")
        for r in v.rules:
            table.add_row(r.label, "" if r.value is None else f"{r.value:.6g}",
                          "" if r.champion_value is None else f"{r.champion_value:.6g}",
                          "pass" if r.passed else "[red]FAIL[/red]", r.reason)
        _console().print(table)
        env = v.extra.get("evaluation")
        if env:  # what a rerun needs to get these numbers again
            pkgs = ", ".join(f"{k} {val}" for k, val in env.get("packages", {}).items() if val != "not installed")
            tiers = ", ".join(f"{k} {h[:12]}" for k, h in env.get("tiers", {}).items())
            typer.echo(f"evaluation {v.evaluation_run}: seeds {env.get('seeds')}, tasks {env.get('tasks')}, "
                       f"{env.get('draws')} draws, noise seed {env.get('noise_seed')}; tiers {tiers}; {pkgs}")
    if not v.passed:
        raise typer.Exit(1)


@registry_app.command()
def promote(model: str, version: str, actor: Annotated[str | None, typer.Option(help="Who promotes (audit).")] = None,
            tracking_uri: UriOption = None, params: ParamsOption = None) -> None:
    """Make a version `champion`: only with a passing verdict judged against the current champion."""
    reg = _registry(tracking_uri, params)
    _run(reg.promote, model, version, actor=actor)
    typer.echo(f"{model} v{int(version)} is champion")


@registry_app.command()
def rollback(model: str, actor: Annotated[str | None, typer.Option(help="Who rolls back (audit).")] = None,
             tracking_uri: UriOption = None, params: ParamsOption = None) -> None:
    """Give `champion` back to the previous champion."""
    reg = _registry(tracking_uri, params)
    ref = _run(reg.rollback, model, actor=actor)
    typer.echo(f"{model} v{ref.version} is champion again")


@registry_app.command()
def history(model: str, tracking_uri: UriOption = None, params: ParamsOption = None, as_json: JsonOption = False) -> None:
    """Every alias move of a model, oldest first; an alias that is not where its last move put it is flagged."""
    from rich.table import Table

    reg = _registry(tracking_uri, params)
    entries = _run(reg.history, model)
    bad = [s for s in _run(reg.alias_states, model) if not s.verified]
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        _say_unverified(model, bad, err=True)
        return
    table = Table("#", "when (UTC)", "action", "alias", "from", "to", "actor", "note", title=f"{model}: alias history")
    last: dict[str, Any] = {}
    for e in entries:
        alias, seen = e["alias"], e["from"]
        note = e.get("found", "")
        if not note and seen != last.get(alias):  # the move found the alias elsewhere than the last move left it
            was = "none" if last.get(alias) is None else f"v{last[alias]}"
            note = f"found {'none' if seen is None else f'v{seen}'}, audited {was}: moved outside the platform before"
        last[alias] = e["to"]
        table.add_row(str(e["seq"]), e["at"], e["action"], alias, "-" if seen is None else f"v{seen}",
                      "-" if e["to"] is None else f"v{e['to']}", e.get("actor", ""), note)
    _console().print(table)
    _say_unverified(model, bad)


@registry_app.command()
def verify(model: Annotated[str | None, typer.Argument(help="Only this model's versions.")] = None,
           repair: Annotated[bool, typer.Option("--repair", help="Put aliases moved outside the platform back "
                                                "to their audited versions (audited as `repair`).")] = False,
           actor: Annotated[str | None, typer.Option(help="Who repairs (audit).")] = None,
           tracking_uri: UriOption = None, params: ParamsOption = None, as_json: JsonOption = False) -> None:
    """Download every version's files and check them against the export hash each was registered with, and every
    alias against its audit trail (exit 1 if a file differs or cannot be fetched, or an alias is not where its last
    audited move put it). Changes nothing, unless `--repair`: then every such alias goes back to its audited
    version (or is deleted where the audit has none), under the model's lock."""
    from rich.table import Table

    reg = _registry(tracking_uri, params)
    found = _run(reg.verify, model)
    rows = [{"model": ref.name, "version": ref.version, "ok": why is None, "problem": why} for ref, why in found]
    bad = _run(reg.unverified, model)
    repaired: set[tuple[str, str]] = set()
    if repair:
        for name in sorted({n for n, _ in bad}):
            repaired |= {(name, e["alias"]) for e in _run(reg.repair, name, actor=actor)}
    alias_rows = [{"model": name, "alias": s.alias, "live": s.live, "audited": s.audited,
                   "ok": (name, s.alias) in repaired, "problem": s.describe(),
                   "repaired": (name, s.alias) in repaired} for name, s in bad]
    if as_json:
        typer.echo(json.dumps(rows + alias_rows, indent=2))
    else:
        table = Table("model", "version", "files", title=f"registry {mask_secrets(reg.tracking_uri)}: verify")
        for r in rows:
            table.add_row(r["model"], f"v{r['version']}", "intact" if r["ok"] else f"BROKEN: {r['problem']}")
        _console().print(table)
        for r in alias_rows:
            audited = "none" if r["audited"] is None else f"v{r['audited']}"
            fixed = f" -> repaired: {r['alias']} is {audited} again" if r["repaired"] else ""
            typer.echo(f"{r['model']}: {r['problem']}{fixed}")
        if not alias_rows:
            typer.echo("aliases: every alias is where its last audited move put it")
        elif not repair:
            typer.echo("  gates and pipelines refuse these; `motus registry verify "
                       f"{model or 'MODEL'} --repair` restores the audited state")
    if any(not r["ok"] for r in rows + alias_rows):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------- lineage

@lineage_app.command()
def show(uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@ALIAS")],
         as_json: JsonOption = False,
         image: Annotated[Path | None, typer.Option(help="Also save the graph picture here (PNG).")] = None,
         attach: Annotated[bool, typer.Option(help="Attach the picture to the version's run.")] = True,
         wide: Annotated[bool, typer.Option("--wide", help="One table row per version (needs ~180 columns).")] = False,
         tracking_uri: UriOption = None, params: ParamsOption = None) -> None:
    """Walk a version back: run, checkpoint, config, code, tiers, parent versions, to the pretrained bases.
    Printed as a tree that fits the terminal; `--wide` for the table."""
    from rich.table import Table

    from ..track import lineage

    reg = _registry(tracking_uri, params)
    graph = _run(lineage.show, reg, uri)
    if attach or image is not None:
        graph["image"] = _run(lineage.attach_picture, reg, graph, image) if attach else str(lineage.plot(graph, image))
    if as_json:
        typer.echo(json.dumps(graph, indent=2, default=str))
        return
    if not wide:
        import shutil

        typer.echo(f"lineage of {uri}")
        for line in lineage.tree_lines(graph, width=max(60, shutil.get_terminal_size((80, 24)).columns)):
            typer.echo(line)
        if graph.get("image"):
            typer.echo(f"picture: {graph['image']}")
        return
    table = Table("version", "stage", "run", "checkpoint", "config", "code", "tiers (level, hash)", "from",
                  "device h", title=f"lineage of {uri}")
    for n in graph["versions"]:
        tiers = "\n".join(f"{t['name']} (L{t['level']}, {t['content_hash'][:12]})" for t in n["tiers"])
        parents = "\n".join(f"{p['role']}: {p['version'] or 'unregistered ' + p.get('export_hash', '')[:12]}"
                            for p in n["parents"]) or "pretrained bases"
        code = n["code_commit"][:10] + (" (dirty)" if n["code_dirty"] == "true" else "")
        table.add_row(f"{n['model']} v{n['version']}", n["stage"], (n["run_id"] or "")[:12], n["checkpoint_hash"][:12],
                      n["config_hash"][:12], code, tiers, parents, f"{n['device_hours'] or 0:.4g}")
    _console().print(table)
    tot = graph["totals"]
    cost = "unknown" if tot["cost"] is None else f"{tot['cost']:.4g} {tot['currency']}"
    typer.echo(f"total along the chain: {tot['device_hours']:.4g} device hours, cost {cost}"
               + (f"; picture: {graph['image']}" if graph.get("image") else ""))


@lineage_app.command()
def uses(tier: Annotated[str, typer.Argument(help="TIER or TIER@HASH (a hash prefix is enough)")],
         as_json: JsonOption = False, tracking_uri: UriOption = None, params: ParamsOption = None) -> None:
    """Every run, checkpoint and version downstream of a data tier."""
    from rich.table import Table

    from ..track import lineage

    name, _, digest = tier.partition("@")
    reg = _registry(tracking_uri, params)
    found = _run(lineage.uses, reg, name, digest or None)
    if as_json:
        typer.echo(json.dumps(found, indent=2, default=str))
        return
    if not found["runs"] and not found["versions"]:
        raise _fail(f"nothing in {reg.tracking_uri} used tier '{tier}'")
    runs = Table("run", "stage", "read the tier", "tier hash", "versions", title=f"runs downstream of {tier}")
    for r in found["runs"]:
        runs.add_row(r["run_id"] or "", r["stage"] or "", "yes" if r["direct"] else "via parent",
                     (r["digest"] or "")[:12], ", ".join(r["versions"]))
    versions = Table("version", "stage", "checkpoint", "direct", title=f"versions downstream of {tier}")
    for v in found["versions"]:
        versions.add_row(v["uri"], v["stage"], v["checkpoint_hash"][:12], "yes" if v["direct"] else "no")
    console = _console()
    console.print(runs)
    console.print(versions)
