"""The frozen encoders a stage reads its windows through (Wan VAE, the text encoder, the VLM), built one way for
the training job and for the encoder cache, and their fingerprint: what a cached feature must match to be read.

The tiny preset's encoders are random, seeded bases: built in a fixed order under a forked RNG, so every rank,
every attempt and the cache builder get the same weights. A fingerprint is the sha256 of the weights actually
loaded: of the tensors for random bases (a few MB), of the files for weights given by path (read once per
file version: the digest is remembered beside the user cache, keyed by path, size and mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .text import FrozenTextEncoder
from .vlm import FrozenVAE, FrozenVLM


@dataclass
class FrozenEncoders:
    vae: FrozenVAE
    text: FrozenTextEncoder
    vlm: FrozenVLM | None

    @classmethod
    def build(cls, cfg: Any, seed: int, device: torch.device | str = "cpu", with_vlm: bool = True) -> FrozenEncoders:
        """The encoders of model config `cfg` (a `MotusConfig`), seeded as a stage job seeds them."""
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            w = cfg.weights
            vae = FrozenVAE(cfg.vae, w.get("vae")).to(device)
            text = FrozenTextEncoder(cfg.video["text_dim"], w.get("text"), max_len=cfg.text_len, seed=seed + 2).to(device)
            vlm = FrozenVLM(cfg.vlm, w.get("vlm")).to(device) if with_vlm else None
        return cls(vae, text, vlm)

    # -- the one preprocessing path: training, the cache builder and evaluation encode windows through these --
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Window video [B, 3, F, H, W] in [-1, 1] -> normalised VAE latents."""
        return self.vae.encode(video)

    def encode_text(self, instructions: list[str]) -> torch.Tensor:
        return self.text(list(instructions))

    def encode_understanding(self, video: torch.Tensor, instructions: list[str], image_size: int) -> Any:
        return understanding_of(self.vlm, video, instructions, image_size)

    def fingerprints(self, cfg: Any) -> dict[str, str]:
        """{encoder: sha256 of its weights} for the encoders built here."""
        w = cfg.weights
        out = {"vae": _fingerprint(self.vae, w.get("vae")), "text": _fingerprint(self.text, w.get("text"))}
        if self.vlm is not None:
            out["vlm"] = _fingerprint(self.vlm, w.get("vlm"))
        return out

    def dtypes(self) -> dict[str, str]:
        """The dtype each encoder computes in. A stage's mixed precision does not reach them (they run outside
        autocast), so this, not the job's precision, is what decides whether cached numbers are the live ones."""
        mods = {"vae": self.vae, "text": self.text, "vlm": self.vlm}
        return {k: str(next(m.parameters()).dtype).removeprefix("torch.") for k, m in mods.items() if m is not None}


def understanding_of(vlm: FrozenVLM, video: torch.Tensor, instructions: list[str], image_size: int) -> Any:
    """The VLM's context (`UnderstandingContext`) of each window's conditioning frame (its first) + instruction."""
    first = (video[:, :, 0].float().clamp(-1, 1) + 1) / 2
    return vlm.encode(vlm.prepare(first.cpu(), list(instructions), image_size))


def _fingerprint(module: torch.nn.Module, weights: str | None) -> str:
    if weights:
        return files_fingerprint(Path(weights))
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_fingerprint(folder: Path) -> str:
    """sha256 over (relative path, sha256) of every file of a weights folder; each file's digest is remembered
    (by path, size and mtime) so a 5 GB checkpoint is read once, not at every job start."""
    folder = folder.expanduser().resolve()
    memo_path = Path(os.environ.get("MOTUS_FINGERPRINT_CACHE", Path.home() / ".cache" / "motus" / "fingerprints.json"))
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h, changed = hashlib.sha256(), False
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        st = p.stat()
        mark = f"{st.st_size}:{st.st_mtime_ns}"
        entry = memo.get(str(p))
        if not entry or entry[0] != mark:
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    digest.update(block)
            entry, changed = [mark, digest.hexdigest()], True
            memo[str(p)] = entry
        h.update(f"{p.relative_to(folder)}\t{entry[1]}\n".encode())
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:  # a read-only home only costs a re-read next time
            pass
    return h.hexdigest()
