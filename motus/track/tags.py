"""The tag codec: how the contracts are written as MLflow `motus.*` tags, and read back.

MLflow tags are flat strings, so a record crosses into the registry flattened and comes back out through
here only: the registry encodes a `LineageRecord` with `lineage_tags`, lineage queries decode tiers with
`tiers_from_tags`. One place says that a tier is `motus.tier.<name>.{level,content_hash,dvc_hash}`.

Versions registered before schema 1 carry `motus.tier.<name>.digest` (the DVC hash where the tier was
versioned, else the content hash); the decoder reads it for one release.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..contracts import LineageRecord, TierRef

T = "motus."  # every tag the platform writes on a version starts with this
TIER = T + "tier."


def tier_tags(tiers: tuple[TierRef, ...] | list[TierRef]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for t in tiers:
        tags[f"{TIER}{t.name}.level"] = "" if t.level is None else str(t.level)
        tags[f"{TIER}{t.name}.content_hash"] = t.content_hash
        tags[f"{TIER}{t.name}.dvc_hash"] = t.dvc_hash or ""
    return tags


LINEAGE_TIER = T + "lineage_tier."  # + tier name: ",<hash>,<hash>," of the tier anywhere in the version's lineage


def lineage_tier_tags(own: Mapping[str, str], parents: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The version tags that let `lineage uses` answer with one search: for every tier the version read, or any
    registered ancestor read, every hash of it (content and DVC). Built from the version's own tier tags and
    its parents' tier and lineage tags (the parents carry their own ancestry already)."""
    hashes: dict[str, set[str]] = {}
    for tags in (own, *parents):
        for ref in tiers_from_tags(tags):
            hashes.setdefault(ref.name, set()).update(h for h in (ref.content_hash, ref.dvc_hash) if h)
        for key, value in tags.items():
            if key.startswith(LINEAGE_TIER):
                hashes.setdefault(key[len(LINEAGE_TIER):], set()).update(h for h in value.split(",") if h)
    return {f"{LINEAGE_TIER}{name}": "," + ",".join(sorted(hs)) + "," for name, hs in sorted(hashes.items()) if hs}


def tiers_from_tags(tags: Mapping[str, str]) -> list[TierRef]:
    names = sorted({k[len(TIER):].rsplit(".", 1)[0] for k in tags if k.startswith(TIER)})
    out = []
    for n in names:
        level = tags.get(f"{TIER}{n}.level", "")
        content = tags.get(f"{TIER}{n}.content_hash", "")
        dvc = tags.get(f"{TIER}{n}.dvc_hash")
        if dvc is None:  # schema 0: `digest` was the DVC hash when the tier was versioned
            digest = tags.get(f"{TIER}{n}.digest", "")
            content = content or digest
            dvc = digest if digest != content else ""
        out.append(TierRef(name=n, level=int(level) if level.isdigit() else None, content_hash=content,
                           dvc_hash=dvc or None))
    return out


def tier_hash_keys(tier: str) -> tuple[str, ...]:
    """The version tags a tier hash may be matched against (either kind of hash, and the schema-0 name)."""
    return tuple(f"{TIER}{tier}.{k}" for k in ("content_hash", "dvc_hash", "digest"))


def lineage_tags(record: LineageRecord, *, run_tags: Mapping[str, str]) -> dict[str, str]:
    """The version tags a lineage record says: what made it. Code state falls back to the run's tags (jobs
    that predate the record's code fields)."""
    commit = record.code_commit or run_tags.get("code.commit", "unknown")
    dirty = record.code_dirty if record.code_dirty is not None else run_tags.get("code.dirty", "unknown")
    return {
        f"{T}stage": record.label, f"{T}stage_number": "" if record.stage_number is None else str(record.stage_number),
        f"{T}config_hash": record.config_hash, f"{T}code_commit": str(commit),
        f"{T}code_dirty": str(dirty).lower(),
        f"{T}device_type": str(record.device_type or run_tags.get("device_type") or run_tags.get("device") or ""),
        **tier_tags(record.tiers),
    }
