"""The encoder cache: what the frozen encoders make of every window of a tier, computed once, read by the stages.

Nothing the frozen encoders compute changes between epochs, yet every training step would decode the window's
video and run the Wan VAE over it, the text encoder over its instruction and the VLM over its conditioning
frame. The `encoded` feature of a tier (`motus data encode TIER`, the `encode@<tier>` DVC stage, the pipeline's
`encode:<tier>` step) holds those outputs, per episode, for every window start:

    latents               float32 [windows, z, 1 + (F-1)/4, H/16, W/16]   the VAE's normalised latents
    text                  float32 [tokens, text_dim]                      the instruction's embedding, cut after
                                                                          its last token (the rest is zeros)
    understanding         float32 [windows * L, vlm_hidden]              the VLM's last hidden states (only when a
    understanding_tokens  int32   [windows]                               stage reading the tier uses the VLM)

stored like any feature (sharded, manifest, content hash; `motus.data.features`). Its manifest's `meta.key`
says what it was computed from: the tier's content hash, each encoder's weights fingerprint, the dtypes the
encoders computed in, and the window geometry. A job reads the cache only when that key is the one it would
compute live; anything else is a miss with a reason (`miss_reason`), logged by the job, which then encodes
live, and shown by `motus pipeline plan`. Shards are memory-mapped: a window is a slice, not a decode.
"""

from __future__ import annotations

import io
import logging
import mmap
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features import Feature, FeatureError, FeatureWriter
from .tier import Tier, shard_members

log = logging.getLogger("motus.data")

FEATURE = "encoded"
KEY_VERSION = 1
VIEWS_KEPT = 4096  # array views kept per reader (episodes x arrays)


# ----------------------------------------------------------------------------------------------- the key

def cache_key(tier: Tier, spec: Any, cfg: Any, encoders: Any) -> dict[str, Any]:
    """What a cache must have been computed from to stand for live encoding in this job: `spec` the job's
    `WindowSpec`, `cfg` its `MotusConfig`, `encoders` its `FrozenEncoders`."""
    return {"version": KEY_VERSION, "tier_hash": tier.content_hash, "encoders": encoders.fingerprints(cfg),
            "dtypes": encoders.dtypes(),
            "geometry": {"image_size": list(spec.image_size), "chunk": spec.chunk,
                         "video_action_ratio": spec.video_action_ratio, "downsample": spec.downsample,
                         "view": spec.view, "vlm_image_size": cfg.vlm_image_size, "text_len": cfg.text_len}}


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else repr(v)
    return s[:12] if isinstance(v, str) and len(v) == 64 else s


def key_difference(have: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """Why a cache computed under `have` does not stand for `want` (None: it does). The cache may carry
    understanding features the job does not read; it may not lack them."""
    if have.get("version") != want.get("version"):
        return f"cache key version {have.get('version')}, this code writes {want.get('version')}"
    if have.get("tier_hash") != want.get("tier_hash"):
        return (f"built from tier content {_short(have.get('tier_hash'))}, the tier is now "
                f"{_short(want.get('tier_hash'))}")
    problems = []
    for enc, fp in want["encoders"].items():
        got = have.get("encoders", {}).get(enc)
        if got is None:
            problems.append(f"no {enc} features (built for stages without the {enc.upper()})")
        elif got != fp:
            problems.append(f"other {enc} weights ({_short(got)}, this job loads {_short(fp)})")
    for enc, dtype in want["dtypes"].items():
        got = have.get("dtypes", {}).get(enc)
        if got is not None and got != dtype:
            problems.append(f"{enc} computed in {got}, this job's runs in {dtype}")
    for name, value in want["geometry"].items():
        got = have.get("geometry", {}).get(name)
        if got != value:
            problems.append(f"geometry {name} {got!r}, this job's is {value!r}")
    return "; ".join(problems) or None


def miss_reason(path: Path, want: Mapping[str, Any], *, verify: bool = False) -> str | None:
    """None when the cache at `path` may be read for a job wanting `want`; else why not, in one line.
    `verify`: also check every shard's sha256 (the builder does; a job checks sizes only)."""
    if not (path / "manifest.json").is_file():
        return f"no encoder cache at {path}"
    try:
        feature = Feature(path)
    except FeatureError as e:
        return f"unreadable cache: {e}"
    why = key_difference(feature.meta.get("key", {}), want)
    if why:
        return why
    bad = feature.verify() if verify else _size_problems(feature)
    if bad:
        return f"cache fails verification: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    return None


def _size_problems(feature: Feature) -> list[str]:
    out = []
    for s in feature.manifest.shards:
        p = feature.path / s["name"]
        if not p.is_file():
            out.append(f"{p}: missing")
        elif p.stat().st_size != s.get("bytes"):
            out.append(f"{p}: {p.stat().st_size} bytes, the manifest says {s.get('bytes')}")
    return out


# ---------------------------------------------------------------------------------------------- building

def build_encoded(tier: Tier, windows: Any, encoders: Any, key: Mapping[str, Any], out: Path, *,
                  vlm_image_size: int, batch: int = 8,
                  progress: Callable[[int, int], None] | None = None) -> Any:
    """Encode every window of `windows` (a `TierWindows` over the whole tier, stride 1) and write the cache to
    `out` atomically. Returns the `FeatureManifest`."""
    if windows.stride != 1 or windows.split != "all":
        raise ValueError("the encoder cache holds every window start: build it from TierWindows(split='all', stride=1)")
    with_vlm = encoders.vlm is not None
    start = time.monotonic()
    with FeatureWriter(out, FEATURE, tier.name, tier.content_hash, meta={"key": dict(key)}) as w:
        for e, episode_id in enumerate(windows.episode_ids):
            lo, hi = windows._cum[e], windows._cum[e + 1]
            latents, feats, tokens = [], [], []
            instruction = ""
            for b in range(lo, hi, batch):
                items = [windows[i] for i in range(b, min(b + batch, hi))]
                video = torch.stack([it["video"] for it in items])
                instruction = items[0]["instruction"]
                with torch.no_grad():
                    latents.append(encoders.encode_video(video).float().cpu().numpy())
                    if with_vlm:
                        ctx = encoders.encode_understanding(video, [it["instruction"] for it in items], vlm_image_size)
                        for f, m in zip(ctx.features.float().cpu(), ctx.mask.cpu(), strict=True):
                            n = int(m.sum())
                            if not bool(m[:n].all()):  # one instruction per episode: right padding only
                                raise ValueError(f"episode '{episode_id}': the VLM mask is not a prefix")
                            feats.append(f[:n].numpy())
                            tokens.append(n)
            with torch.no_grad():
                text = encoders.encode_text([instruction])[0].float().cpu().numpy()
            used = np.flatnonzero(np.abs(text).sum(1) > 0)
            arrays = {"latents": np.concatenate(latents), "text": text[: (used[-1] + 1 if len(used) else 0)]}
            if with_vlm:
                arrays["understanding"] = np.concatenate(feats)
                arrays["understanding_tokens"] = np.asarray(tokens, dtype=np.int32)
            w.add(episode_id, arrays)
            if progress is not None:
                progress(e + 1, len(windows.episode_ids))
        manifest = w.close()
    log.info("encoded %d windows of %d episodes of tier '%s' in %.1f s", len(windows), len(windows.episode_ids),
             tier.name, time.monotonic() - start)
    return manifest


# ----------------------------------------------------------------------------------------------- reading

class EncodedWindows:
    """A tier's encoder cache, read by window: `window(episode_id, start)` -> the tensors `window_inputs` would
    have computed. Arrays are views into memory-mapped shards: reading a window copies one window's bytes."""

    def __init__(self, path: Path, text_len: int):
        self.feature = Feature(path)
        self.text_len = int(text_len)
        self.with_understanding = "understanding" in self.feature.manifest.arrays
        self._maps: dict[int, tuple[mmap.mmap, dict[str, tuple[int, int]]]] = {}
        # views hold no data (the page cache does), but a million episodes' worth of them is still memory
        self._views: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._offsets: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def content_hash(self) -> str:
        return self.feature.content_hash

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self.feature

    def _shard(self, shard: int) -> tuple[mmap.mmap, dict[str, tuple[int, int]]]:
        if shard not in self._maps:
            p = self.feature.path / self.feature.manifest.shards[shard]["name"]
            with open(p, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[shard] = (mm, shard_members(p))
        return self._maps[shard]

    def array(self, episode_id: str, name: str) -> np.ndarray:
        """The episode's array `name` as a read-only view of the shard (no copy)."""
        got = self._views.get((episode_id, name))
        if got is None:
            rec = self.feature._by_id.get(episode_id)
            if rec is None:
                raise KeyError(f"the encoder cache of tier '{self.feature.tier}' has no episode '{episode_id}'")
            mm, members = self._shard(rec["shard"])
            member = f"{episode_id}.{name}.npy"
            if member not in members:
                raise FeatureError(f"{self.feature.path}: shard {rec['shard']} has no member '{member}'")
            offset, size = members[member]
            head = io.BytesIO(mm[offset: offset + min(size, 4096)])
            try:
                version = np.lib.format.read_magic(head)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(head) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(head))
            except ValueError as e:
                raise FeatureError(f"{self.feature.path}: member '{member}' is corrupt ({e})") from None
            got = np.ndarray(shape, dtype, buffer=mm, offset=offset + head.tell(), order="F" if fortran else "C")
            self._views[(episode_id, name)] = got
            while len(self._views) > VIEWS_KEPT:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end((episode_id, name))
        return got

    def window(self, episode_id: str, start: int) -> dict[str, Any]:
        latents = self.array(episode_id, "latents")
        if not 0 <= start < len(latents):
            raise IndexError(f"encoder cache of '{self.feature.tier}/{episode_id}': window {start} of {len(latents)}")
        stored = self.array(episode_id, "text")
        text = np.zeros((self.text_len, stored.shape[1]), np.float32)
        text[: len(stored)] = stored[: self.text_len]
        out: dict[str, Any] = {"video_latents": torch.from_numpy(np.array(latents[start])),
                               "text_embeds": torch.from_numpy(text), "understanding": None}
        if self.with_understanding:
            offsets = self._offsets.get(episode_id)
            if offsets is None:
                offsets = np.concatenate([[0], np.cumsum(self.array(episode_id, "understanding_tokens"))])
                self._offsets[episode_id] = offsets
                while len(self._offsets) > VIEWS_KEPT:
                    self._offsets.popitem(last=False)
            rows = self.array(episode_id, "understanding")[offsets[start]: offsets[start + 1]]
            out["understanding"] = torch.from_numpy(np.array(rows))
        return out

    def close(self) -> None:
        self._views.clear()
        for mm, _ in self._maps.values():
            mm.close()
        self._maps.clear()
