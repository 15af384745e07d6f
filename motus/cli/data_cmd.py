"""`motus data ...`: build, version and inspect the data pyramid's tiers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, help="Build, version and inspect the data tiers (levels 2-6).")

ParamsOption = Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml to read (default: MOTUS_PARAMS_FILE or ./params.yaml).")]


def _params(path: Path | None):
    from ..config import ConfigError, get_settings, load_params

    try:
        settings = get_settings()
        return load_params(path or settings.params_file), settings
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None


def _pick(params, names: list[str]) -> list[str]:
    if not names:
        return list(params.tiers)
    unknown = [n for n in names if n not in params.tiers]
    if unknown:
        typer.echo(f"unknown tier(s) {unknown}; params.yaml defines {sorted(params.tiers)}", err=True)
        raise typer.Exit(2)
    return names


@data_app.command()
def ingest(tiers: Annotated[list[str] | None, typer.Argument(help="Tier names (default: every tier).")] = None,
           params: ParamsOption = None,
           workers: Annotated[int, typer.Option(min=1, help="Processes that validate and encode episodes; the tier "
                                                "is byte-identical whatever the number.")] = 1) -> None:
    """Read each tier's source, validate every episode, write shards + manifest; quarantine bad episodes."""
    from tqdm import tqdm

    from ..data.ingest import IngestError, ingest_tier

    p, _ = _params(params)
    failed = []
    for name in _pick(p, tiers or []):
        tier = p.tiers[name]
        tier.source.options.setdefault("codec", p.data.codec)
        tier.source.options.setdefault("shard_mb", p.data.shard_mb)
        bar = tqdm(desc=f"{name} (level {tier.level})", unit="ep", leave=True)

        def progress(good: int, bad: int, bar=bar) -> None:
            # the counts are redrawn with the bar (every 0.1 s), not per episode: a redraw per episode cost
            # ~50 us of the writer's time, and wrote a line per episode into a captured log
            bar.set_postfix(valid=good, quarantined=bad, refresh=False)
            bar.update(1)

        started = time.perf_counter()
        try:
            m = ingest_tier(name, tier, Path(p.data.root) / name, progress=progress, workers=workers)
        except IngestError as e:
            bar.close()
            typer.echo(f"error: {e}", err=True)
            failed.append(name)
            continue
        bar.close()
        typer.echo(f"{name}: {m.source_episodes} source episodes = {m.episodes} kept + {m.quarantined} quarantined; "
                   f"{m.frames} frames, {len(m.shards)} shard(s), {time.perf_counter() - started:.1f}s "
                   f"-> {Path(p.data.root) / name}")
        if m.quarantined:
            typer.echo(f"  quarantined by reason: {_reason_counts(Path(p.data.root) / name)}; detail: "
                       f"{Path(p.data.root) / name / 'ingest.log'}")
        if m.without_instruction:
            typer.echo(f"  {m.without_instruction} kept episode(s) have no language instruction (listed in "
                       f"{Path(p.data.root) / name / 'ingest.log'})")
    if failed:
        raise typer.Exit(1)


@data_app.command()
def encode(tiers: Annotated[list[str] | None, typer.Argument(
               help="Tier names (default: every tier a stage reads).")] = None,
           batch: Annotated[int, typer.Option(min=1, help="Windows per encoder call.")] = 8,
           force: Annotated[bool, typer.Option(help="Rebuild even when the cache matches.")] = False,
           params: ParamsOption = None) -> None:
    """Run the frozen encoders (VAE, text, VLM) over every window of each tier once and keep what they make
    (features/encoded/<tier>): the stages then read latents instead of decoding video. A cache built from
    another tier version, other encoder weights or dtypes, or another window geometry is rebuilt, as is one
    whose shards fail verification."""
    from tqdm import tqdm

    from ..data.features import FeatureError
    from ..train.encode import encode_tier

    p, _ = _params(params)
    names = _pick(p, tiers or []) if tiers else sorted({t for s in p.stages.values() for t in s.tiers})
    for name in names:
        bar = tqdm(desc=f"encode {name}", unit="ep")

        def progress(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        started = time.perf_counter()
        try:
            m, what = encode_tier(p, name, batch=batch, force=force, progress=progress)
        except (ValueError, FeatureError) as e:
            bar.close()
            typer.echo(f"error: {name}: {e}", err=True)
            raise typer.Exit(1) from None
        bar.close()
        typer.echo(f"encoded/{name}: {what}; {m.episodes} episodes, content {m.content_hash[:12]}, "
                   f"{time.perf_counter() - started:.1f}s")


def _reason_counts(tier_dir: Path) -> str:
    """'timestamps.negative x2, episode.duplicate_id x2' from a tier's quarantine records."""
    from collections import Counter

    from ..data.reasons import code_of
    from ..data.tier import QUARANTINE

    counts: Counter[str] = Counter()
    path = tier_dir / QUARANTINE
    for line in path.read_text().splitlines() if path.exists() else []:
        counts.update(code_of(r) for r in json.loads(line)["reasons"])
    return ", ".join(f"{code} x{n}" for code, n in counts.most_common())


@data_app.command()
def version(tiers: Annotated[list[str] | None, typer.Argument(help="Tier names (default: every tier).")] = None,
            params: ParamsOption = None,
            push: bool = typer.Option(True, help="Push to the remote after reproducing."),
            force: bool = typer.Option(False, help="Rebuild even when DVC says nothing changed.")) -> None:
    """`dvc repro` the tiers that changed and push them to MOTUS_DATA_REMOTE; print each tier's DVC hash."""
    from ..data import versioning as v

    p, settings = _params(params)
    names = _pick(p, tiers or [])
    root = Path.cwd()
    try:
        v.ensure_repo(root)
        v.configure_cache(root, settings.dvc_cache_type)
        url = v.configure_remote(root, settings.data_remote, settings.s3_endpoint_url)
        v.reproduce(root, names, force=force)
        if push:
            v.push(root, names)
    except v.VersioningError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    hashes = v.locked_hashes(root)
    for n in names:
        typer.echo(f"{n}: dvc {hashes.get(n, '?')}" + (f" -> pushed to {url}" if push else ""))


@data_app.command()
def status(params: ParamsOption = None, cloud: bool = typer.Option(False, help="Also ask the remote what it lacks."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Every tier: built or not, episodes, quarantined, content hash, DVC hash, stale or not."""
    # Everything shown comes from each tier's manifest.json, dvc.lock and `dvc status` (kept between runs while
    # nothing it read changed): no episode index is parsed, no shard hashed, and motus.data.tier (numpy,
    # PyAV) is not imported, so the command costs the same for a tier of 10 episodes or 10^6.
    from ..contracts import ContractError, TierManifest
    from ..data import versioning as v

    p, _ = _params(params)
    root = Path.cwd()
    hashes = v.locked_hashes(root)
    stale = v.stale_ingest_stages(root) if (root / ".dvc").is_dir() else set()
    remote = v.stale_tiers(root, cloud=True) if cloud and (root / ".dvc").is_dir() else {}
    if "error" in remote:  # never "NOT pushed" for every tier when the question could not be asked
        from ..config import get_settings
        from ..contracts import ServiceUnreachable, mask_secrets

        why = " ".join(str(remote["error"]).split())[:300]
        raise ServiceUnreachable(f"remote unreachable: the DVC remote {mask_secrets(str(get_settings().data_remote))} "
                                 f"did not answer `dvc status --cloud` ({mask_secrets(why)})")
    rows = []
    for name, tier in p.tiers.items():
        row = {"tier": name, "level": tier.level, "built": False, "dvc_hash": hashes.get(name),
               "stale": v.stage_name(name) in stale}
        if cloud:
            row["pushed"] = not any(name in k for k in remote) and "error" not in remote
        folder = Path(p.data.root) / name
        try:  # built as `Tier` opens it: a readable manifest and the episode index beside it (tier.INDEX)
            m = TierManifest.read(folder)
            if (folder / "episodes.jsonl").is_file():
                row.update(built=True, episodes=m.episodes, frames=m.frames, quarantined=m.quarantined,
                           content_hash=m.content_hash[:12])
        except ContractError:
            pass
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'tier':24s} {'lvl':>3s} {'episodes':>8s} {'quar.':>5s} {'content':12s}  {'dvc':34s} state")
    for r in rows:
        state = "not built" if not r["built"] else ("changed since repro" if r["stale"] else "up to date")
        if cloud and r["built"]:
            state += ", pushed" if r.get("pushed") else ", NOT pushed"
        typer.echo(f"{r['tier']:24s} {r['level']:3d} {r.get('episodes', '-')!s:>8s} {r.get('quarantined', '-')!s:>5s} "
                   f"{r.get('content_hash', '-'):12s}  {r['dvc_hash'] or '-':34s} {state}")


@data_app.command()
def show(tier: str, params: ParamsOption = None,
         episodes: int = typer.Option(5, help="How many episodes of the index to list."),
         as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON.")) -> None:
    """A built tier's manifest: counts, dims, statistics, shards, quarantine reasons."""
    from ..data.tier import Tier, TierError

    p, _ = _params(params)
    _pick(p, [tier])
    try:
        t = Tier(Path(p.data.root) / tier)
    except TierError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    m = t.manifest
    if as_json:
        typer.echo(json.dumps(m.to_json(), indent=2))
        return
    accounted = "" if m.source_episodes is None else f" of {m.source_episodes} source episodes"
    typer.echo(f"tier {m.tier} (level {m.level}, {m.embodiment}): {m.episodes} episodes{accounted}, {m.frames} frames, "
               f"{m.quarantined} quarantined" + (f" ({_reason_counts(t.path)})" if m.quarantined else "")
               + (f", {m.without_instruction} without instruction" if m.without_instruction else ""))
    typer.echo(f"  action_dim {m.action_dim}, state_dim {m.state_dim}, fps {m.fps or list(m.fps_values)}, "
               f"views {dict(m.views)}, codec {m.codec}")
    typer.echo(f"  embodiments: {json.dumps(dict(m.embodiments))}")
    typer.echo(f"  content hash {m.content_hash}; {len(m.shards)} shard(s), "
               f"{sum(s['bytes'] for s in m.shards) / 2**20:.1f} MB")
    if m.action_stats:
        s = m.action_stats
        typer.echo(f"  actions mean {s['mean'][:4]}... std {s['std'][:4]}...")
    for rec in t.head(episodes):
        typer.echo(f"  - {rec['id']}: {rec['frames']} frames, {rec['embodiment']}, {rec['instructions'][:1]}")
    for q in t.quarantined()[:episodes]:
        typer.echo(f"  quarantined {q['episode']}: {'; '.join(q['reasons'])}")
