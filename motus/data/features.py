"""Per-episode feature arrays derived from one tier (flow images, latent actions, ...), stored like tiers.

    <root>/<feature>/<tier>/manifest.json    feature, tier, tier_hash, schema version, episode count, array
                                             schema {name: {dtype, shape (trailing dims)}}, shards with sha256
                                             and bytes, meta (e.g. flow normalisation), content hash
    <root>/<feature>/<tier>/episodes.jsonl   one line per episode: id, shard, arrays {name: full shape}
    <root>/<feature>/<tier>/shards/shard-000000.tar   members `{episode_id}.{array}.npy` (or `.npz`)

Members are written deterministically (tier.py's `_add`: sorted names, zero mtimes/owners; `.npz` members use a
fixed zip timestamp), so the same inputs give the same bytes and the same content hash. The store is written
into a temporary sibling folder and renamed into place only when complete. `tier_hash` is the source tier's
content hash: a feature whose tier_hash differs from the tier's current hash is stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import ContractError, FeatureManifest
from .episode import EPISODE_ID
from .tier import (
    DEFAULT_SHARD_BYTES,
    INDEX,
    MANIFEST,
    SHARD_DIR,
    _add,
    _npy,
    sha256_file,
    swap_into_place,
    write_jsonl,
)

FEATURE_SCHEMA_VERSION = FeatureManifest.SCHEMA
NAME = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")  # feature, tier and array names: dot-free and path-safe
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class FeatureError(Exception):
    """A feature store that cannot be read or does not match its manifest; the message names the file."""


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{kind} name {name!r} must match {NAME.pattern}")
    return name


def feature_dir(root: str | Path, feature: str, tier: str) -> Path:
    """Where feature `feature` of tier `tier` lives: <root>/<feature>/<tier>."""
    return Path(root) / _check_name("feature", feature) / _check_name("tier", tier)


def _npz(name: str, a: np.ndarray) -> bytes:
    """A compressed .npz holding one array `name`, byte-for-byte deterministic (np.savez stamps the time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
        info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
        z.writestr(info, _npy(a), compresslevel=6)
    return buf.getvalue()


class FeatureWriter:
    """Append per-episode arrays; `close()` writes the manifest and moves the store into place atomically."""

    def __init__(self, out_dir: str | Path, feature: str, tier_name: str, tier_hash: str,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, compress: bool = False, meta: dict[str, Any] | None = None):
        self.out = Path(out_dir)
        self.feature, self.tier_name = _check_name("feature", feature), _check_name("tier", tier_name)
        self.tier_hash = str(tier_hash)
        self.shard_bytes, self.compress = int(shard_bytes), bool(compress)
        self.meta = json.loads(json.dumps(meta or {}, sort_keys=True))  # fail early if not JSON-safe
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / SHARD_DIR).mkdir()
        self._tar: tarfile.TarFile | None = None
        self._shard_idx, self._shard_size = -1, 0
        self.shards: list[dict[str, Any]] = []
        self.index: list[dict[str, Any]] = []
        self.arrays: dict[str, dict[str, Any]] = {}
        self._ids: set[str] = set()

    def _shard_path(self, i: int) -> Path:
        return self.tmp / SHARD_DIR / f"shard-{i:06d}.tar"

    def _roll(self) -> None:
        self._finish_shard()
        self._shard_idx += 1
        self._tar = tarfile.open(self._shard_path(self._shard_idx), "w", format=tarfile.USTAR_FORMAT)
        self._shard_size = 0
        self.shards.append({"name": f"{SHARD_DIR}/shard-{self._shard_idx:06d}.tar", "episodes": 0})

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            p = self._shard_path(self._shard_idx)
            self.shards[-1].update(sha256=sha256_file(p), bytes=p.stat().st_size)

    def add(self, episode_id: str, arrays: dict[str, np.ndarray]) -> None:
        """Store one episode's arrays. Every episode must carry the same array names, dtypes and trailing
        shapes (the leading dim, usually time, may differ)."""
        if not isinstance(episode_id, str) or not EPISODE_ID.match(episode_id):
            raise ValueError(f"episode_id {episode_id!r} must match {EPISODE_ID.pattern}")
        if episode_id in self._ids:
            raise ValueError(f"duplicate episode id '{episode_id}' in feature '{self.feature}'")
        if not arrays:
            raise ValueError(f"episode '{episode_id}': no arrays")
        if self.arrays and sorted(arrays) != sorted(self.arrays):
            raise ValueError(f"episode '{episode_id}': arrays {sorted(arrays)}, the feature stores {sorted(self.arrays)}")
        members: list[tuple[str, bytes]] = []
        shapes: dict[str, list[int]] = {}
        schema: dict[str, dict[str, Any]] = {}
        for name in sorted(arrays):
            _check_name("array", name)
            a = np.asarray(arrays[name])
            if a.dtype == object:
                raise ValueError(f"episode '{episode_id}': array '{name}' has dtype object")
            spec = {"dtype": a.dtype.str, "shape": list(a.shape[1:])}
            if name in self.arrays and self.arrays[name] != spec:
                raise ValueError(f"episode '{episode_id}': array '{name}' is {spec}, "
                                 f"earlier episodes are {self.arrays[name]}")
            schema[name] = spec
            shapes[name] = list(a.shape)
            data = _npz(name, a) if self.compress else _npy(a)
            members.append((f"{episode_id}.{name}.{'npz' if self.compress else 'npy'}", data))
        size = sum(len(d) for _, d in members)
        if self._tar is None or (self._shard_size and self._shard_size + size > self.shard_bytes):
            self._roll()
        for name, data in members:
            _add(self._tar, name, data)
        self._shard_size += size
        self.shards[-1]["episodes"] += 1
        self.arrays.update(schema)
        self._ids.add(episode_id)
        self.index.append({"id": episode_id, "shard": self._shard_idx, "arrays": shapes})

    def close(self) -> FeatureManifest:
        self._finish_shard()
        if not self.index:
            self.abort()
            raise FeatureError(f"{self.out}: feature '{self.feature}' of tier '{self.tier_name}' has no episodes")
        manifest = self._manifest()
        write_jsonl(self.tmp / INDEX, self.index)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
        swap_into_place(self.tmp, self.out)
        return manifest

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _manifest(self) -> FeatureManifest:
        index_hash = hashlib.sha256("".join(json.dumps(r, sort_keys=True) for r in self.index).encode()).hexdigest()
        header = json.dumps({"feature": self.feature, "tier_hash": self.tier_hash, "meta": self.meta,
                             "arrays": self.arrays, "compress": self.compress}, sort_keys=True)
        content = hashlib.sha256(
            (header + index_hash + "".join(s["sha256"] for s in self.shards)).encode()).hexdigest()
        return FeatureManifest(feature=self.feature, tier=self.tier_name, tier_hash=self.tier_hash,
                               episodes=len(self.index), arrays=self.arrays, compress=self.compress,
                               shards=tuple(self.shards), meta=self.meta, index_sha256=index_hash,
                               content_hash=content)


class Feature:
    """Read access to a finished feature store: manifest, episode ids, arrays by (episode, name)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = FeatureManifest.read(self.path)
        except ContractError as e:
            raise FeatureError(str(e)) from None
        ipath = self.path / INDEX
        if not ipath.exists():
            raise FeatureError(f"{ipath}: not found")
        try:
            self.index = [json.loads(line) for line in ipath.read_text().splitlines() if line]
        except json.JSONDecodeError as e:
            raise FeatureError(f"{ipath}: invalid JSON ({e})") from None
        self._by_id = {r["id"]: r for r in self.index}
        self._members: dict[int, dict[str, tarfile.TarInfo]] = {}
        self._ext = "npz" if self.manifest.compress else "npy"

    @property
    def name(self) -> str:
        return self.manifest.feature

    @property
    def tier(self) -> str:
        return self.manifest.tier

    @property
    def tier_hash(self) -> str:
        return self.manifest.tier_hash

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.manifest.meta)

    @property
    def array_names(self) -> list[str]:
        return sorted(self.manifest.arrays)

    @property
    def episode_ids(self) -> list[str]:
        return [r["id"] for r in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, episode_id: object) -> bool:
        return episode_id in self._by_id

    def _shard_file(self, shard: int) -> Path:
        return self.path / self.manifest.shards[shard]["name"]

    def _shard_members(self, shard: int) -> dict[str, tarfile.TarInfo]:
        if shard not in self._members:
            p = self._shard_file(shard)
            try:
                with tarfile.open(p) as tar:
                    self._members[shard] = {m.name: m for m in tar.getmembers()}
            except FileNotFoundError:
                raise FeatureError(f"{p}: shard missing") from None
            except tarfile.TarError as e:
                raise FeatureError(f"{p}: unreadable shard ({e})") from None
        return self._members[shard]

    def _read(self, shard: int, name: str) -> bytes:
        info = self._shard_members(shard).get(name)
        if info is None:
            raise FeatureError(f"{self._shard_file(shard)}: member '{name}' missing")
        with open(self._shard_file(shard), "rb") as f:
            f.seek(info.offset_data)
            data = f.read(info.size)
        if len(data) != info.size:
            raise FeatureError(f"{self._shard_file(shard)}: member '{name}' truncated")
        return data

    def get(self, episode_id: str, name: str) -> np.ndarray:
        rec = self._by_id.get(episode_id)
        if rec is None:
            raise KeyError(f"feature '{self.name}' of tier '{self.tier}' has no episode '{episode_id}'")
        if name not in self.manifest.arrays:
            raise KeyError(f"feature '{self.name}' has no array '{name}' (has {self.array_names})")
        member = f"{episode_id}.{name}.{self._ext}"
        data = self._read(rec["shard"], member)
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    loaded = loaded[name]
        except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt member
            raise FeatureError(f"{self._shard_file(rec['shard'])}: member '{member}' is corrupt ({e})") from None
        return loaded

    def arrays(self, episode_id: str) -> dict[str, np.ndarray]:
        return {n: self.get(episode_id, n) for n in self.array_names}

    def verify(self) -> list[str]:
        """Shards whose bytes no longer match the manifest (empty = intact)."""
        bad = []
        for s in self.manifest.shards:
            p = self.path / s["name"]
            if not p.exists():
                bad.append(f"{p}: missing")
            elif p.stat().st_size != s.get("bytes", p.stat().st_size):
                bad.append(f"{p}: {p.stat().st_size} bytes, the manifest says {s['bytes']}")
            elif sha256_file(p) != s["sha256"]:
                bad.append(f"{p}: sha256 differs from the manifest")
        return bad

    def is_stale(self, tier_content_hash: str) -> bool:
        """True when the feature was computed from a different version of its tier."""
        return self.tier_hash != tier_content_hash
