"""The latent-action VAE (Stage 2 ingredient): optical flow as a pixel-level "delta action".

flow image [B, 3, H, W] in [-1, 1] -> DC-AE encoder -> N tokens x D -> light MLP encoder -> 14-d latent action
(mean, log-variance) -> light MLP decoder -> N tokens -> DC-AE decoder -> reconstructed flow image.

Loss (paper, latent actions section): L = MSE(recon, flow) + lambda_a * ||mu - a||^2 (labelled rows only)
+ beta * KL(N(mu, sigma) || N(0, 1)). The paper's scale is 64x64 flow images -> DC-AE f32 -> 4 tokens x 512.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_FILE = "latent_action_config.json"
WEIGHTS_FILE = "latent_action.safetensors"
FORMAT_VERSION = 1
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class LatentActionConfig:
    preset: str
    image_size: int  # side of the square flow image
    dcae: dict[str, Any]  # diffusers AutoencoderDC constructor arguments, verbatim
    num_tokens: int  # (image_size / spatial compression)^2
    token_dim: int  # = dcae latent_channels
    latent_dim: int = 14  # the scale of a robot action
    hidden: int = 1024  # width of the light encoder / decoder MLPs
    lambda_action: float = 1.0
    beta_kl: float = 1e-6
    # Local folder of a pretrained DC-AE in diffusers format (never downloaded). None = random init.
    weights: str | None = field(default=None)

    # --- derived geometry -------------------------------------------------------------------------------
    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dcae.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024))) - 1)

    @property
    def grid(self) -> int:
        """Side of the DC-AE latent grid (tokens are its flattened cells)."""
        return self.image_size // self.spatial_compression

    def validate(self) -> None:
        errors = []
        s = self.spatial_compression
        if self.image_size < s or self.image_size % s != 0:
            errors.append(f"image_size={self.image_size} must be a positive multiple of the DC-AE spatial "
                          f"compression {s} (2^(stages-1))")
        elif self.num_tokens != self.grid ** 2:
            errors.append(f"num_tokens={self.num_tokens} must equal (image_size/{s})^2 = {self.grid ** 2}")
        latent_channels = int(self.dcae.get("latent_channels", 32))
        if self.token_dim != latent_channels:
            errors.append(f"token_dim={self.token_dim} must equal dcae.latent_channels={latent_channels}")
        if int(self.dcae.get("in_channels", 3)) != 3:
            errors.append(f"dcae.in_channels={self.dcae.get('in_channels')} must be 3 (RGB flow image)")
        for side, flag in (("encoder", "encoder_out_shortcut"), ("decoder", "decoder_in_shortcut")):
            chans = self.dcae.get(f"{side}_block_out_channels", (128, 256, 512, 512, 1024, 1024))
            if self.dcae.get(flag, True) and chans[-1] % latent_channels != 0:
                errors.append(f"dcae.{side}_block_out_channels[-1]={chans[-1]} must be a multiple of "
                              f"latent_channels={latent_channels} ({flag})")
        enc = self.dcae.get("encoder_block_out_channels")
        dec = self.dcae.get("decoder_block_out_channels")
        if enc is not None and dec is not None and len(enc) != len(dec):
            errors.append(f"dcae encoder/decoder stage counts differ ({len(enc)} vs {len(dec)})")
        for name in ("latent_dim", "hidden"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lambda_action", "beta_kl"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        if errors:
            raise ValueError("invalid latent-action config:\n  " + "\n  ".join(errors))

    # --- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentActionConfig:
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys in latent-action config: {sorted(unknown)}")
        return cls(**d)


def tiny() -> LatentActionConfig:
    """16x16 flow images, a 4-stage ResBlock-only DC-AE (f8, a few channels): 2x2 = 4 tokens x 16; trains in
    seconds on a CPU. (Four stages rather than three so the token count matches the paper's 4.)"""
    chans = [8, 16, 32, 32]
    return LatentActionConfig(
        preset="tiny",
        image_size=16,
        dcae=dict(
            in_channels=3, latent_channels=16, attention_head_dim=8,
            encoder_block_types="ResBlock", decoder_block_types="ResBlock",
            encoder_block_out_channels=chans, decoder_block_out_channels=chans,
            encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1],
            encoder_qkv_multiscales=[[], [], [], []], decoder_qkv_multiscales=[[], [], [], []],
            upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
            decoder_norm_types="rms_norm", decoder_act_fns="silu",
        ),
        num_tokens=4, token_dim=16, latent_dim=14, hidden=64,
    )


def full() -> LatentActionConfig:
    """Paper scale: 64x64 flow images, DC-AE f32 (6 stages, 128..1024 channels, EfficientViT blocks in the last
    three stages) with 512 latent channels -> 2x2 = 4 tokens x 512; MLPs 1024 wide."""
    chans = [128, 256, 512, 512, 1024, 1024]
    return LatentActionConfig(
        preset="full",
        image_size=64,
        dcae=dict(
            in_channels=3, latent_channels=512, attention_head_dim=32,
            encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
            decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
            encoder_block_out_channels=chans, decoder_block_out_channels=chans,
            encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
            encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
            decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
            upsample_block_type="interpolate", downsample_block_type="Conv",
            decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3,
            decoder_act_fns=["relu"] * 3 + ["silu"] * 3,
        ),
        num_tokens=4, token_dim=512, latent_dim=14, hidden=1024,
    )


PRESETS = {"tiny": tiny, "full": full}


def _merge(base: Any, override: Any, path: str) -> Any:
    if dataclasses.is_dataclass(base):
        if not isinstance(override, dict):
            raise ValueError(f"latent-action override '{path or '.'}' must be a mapping")
        names = {f.name for f in dataclasses.fields(base)}
        for k, v in override.items():
            if k not in names:
                raise ValueError(f"unknown latent-action override '{k}'; expected one of {sorted(names)}")
            setattr(base, k, _merge(getattr(base, k), v, f"{path}.{k}".lstrip(".")))
        return base
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v, f"{path}.{k}") if k in base else v
        return out
    return override


def build_latent_action_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> LatentActionConfig:
    """A preset with nested overrides (e.g. {"hidden": 32, "dcae": {"latent_channels": 8}}) applied, validated.

    num_tokens / token_dim are re-derived from image_size / dcae unless the overrides set them explicitly."""
    if preset not in PRESETS:
        raise ValueError(f"unknown latent-action preset '{preset}'; expected one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if overrides:
        cfg = _merge(cfg, overrides, "")
        # Derived sizes follow the geometry unless the override names them (then validate() checks them).
        if "num_tokens" not in overrides and cfg.image_size % cfg.spatial_compression == 0:
            cfg.num_tokens = cfg.grid ** 2
        if "token_dim" not in overrides:
            cfg.token_dim = int(cfg.dcae.get("latent_channels", 32))
    cfg.validate()
    return cfg


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, d_out))


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), summed over latent dims, averaged over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1).mean()


class LatentActionVAE(nn.Module):
    """Flow image -> 14-d latent action -> flow image. See the module docstring for the data path."""

    def __init__(self, config: LatentActionConfig, *, weights: str | None = None, load_weights: bool = True):
        """`weights` (a local diffusers AutoencoderDC folder) overrides config.weights; load_weights=False builds
        the DC-AE from config.dcae without reading any folder (from_pretrained restores all weights itself)."""
        super().__init__()
        from diffusers import AutoencoderDC

        config = copy.deepcopy(config)
        if weights is not None:
            config.weights = str(weights)
        config.validate()
        if config.weights and load_weights:
            p = Path(config.weights)
            if not p.is_dir():
                raise FileNotFoundError(f"DC-AE weights folder {p} not found (latent-action config 'weights'; "
                                        "expected a diffusers AutoencoderDC folder with config.json)")
            self.dcae = AutoencoderDC.from_pretrained(str(p), local_files_only=True)
            # The checkpoint's own architecture wins; record it so save_pretrained is self-contained.
            config.dcae = {k: v for k, v in dict(self.dcae.config).items() if not k.startswith("_")}
            config.validate()
        else:
            self.dcae = AutoencoderDC(**config.dcae)
        self.config = config
        n, d, z = config.num_tokens, config.token_dim, config.latent_dim
        self.in_norm = nn.LayerNorm(n * d)
        self.encoder = _mlp(n * d, config.hidden, 2 * z)
        self.decoder = _mlp(z, config.hidden, n * d)

    # --- shape checks ----------------------------------------------------------------------------------
    def _check_flow(self, x: torch.Tensor) -> int:
        s = self.config.image_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"flow_rgb must be [B, 3, {s}, {s}] (an RGB flow image in [-1, 1], preset "
                             f"'{self.config.preset}'), got {got}")
        return x.shape[0]

    def _check_latent(self, z: torch.Tensor, name: str = "z", b: int | None = None) -> None:
        d = self.config.latent_dim
        if z.ndim != 2 or z.shape[1] != d or (b is not None and z.shape[0] != b):
            raise ValueError(f"{name} must be [B{'=' + str(b) if b is not None else ''}, {d}], got {tuple(z.shape)}")

    # --- the two halves --------------------------------------------------------------------------------
    def encode(self, flow_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flow_rgb [B, 3, H, W] -> (mu [B, latent_dim], logvar [B, latent_dim], tokens [B, N, D])."""
        b = self._check_flow(flow_rgb)
        lat = self.dcae.encode(flow_rgb).latent * self.dcae.config.scaling_factor  # [B, D, g, g]
        tokens = lat.flatten(2).transpose(1, 2)  # [B, N, D]
        h = self.encoder(self.in_norm(tokens.reshape(b, -1)))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(*LOGVAR_RANGE), tokens

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent_dim] -> reconstructed flow image [B, 3, H, W]."""
        self._check_latent(z)
        cfg = self.config
        tokens = self.decoder(z).reshape(z.shape[0], cfg.num_tokens, cfg.token_dim)
        lat = tokens.transpose(1, 2).reshape(z.shape[0], cfg.token_dim, cfg.grid, cfg.grid)
        return self.dcae.decode(lat / self.dcae.config.scaling_factor).sample

    def forward(
        self,
        flow_rgb: torch.Tensor,
        actions: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses and outputs. `actions` [B, latent_dim] are real robot actions; `action_mask` [B] bool marks the
        labelled rows (default: all rows labelled when actions are given), or [B, latent_dim] bool the labelled dims
        of each row (an embodiment with fewer native action dims labels only those). Unlabelled rows' actions are ignored
        (they may hold anything, NaN included). loss = recon + lambda_action * action_loss + beta_kl * kl; the
        returned action_loss / kl are the unweighted terms."""
        b = self._check_flow(flow_rgb)
        mu, logvar, _ = self.encode(flow_rgb)
        if self.training:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + eps * (0.5 * logvar).exp()
        else:
            z = mu
        recon = self.decode(z)
        # losses reduced in fp32 whatever the forward's precision (bf16 autocast leaves mu/recon in bf16)
        recon_loss = F.mse_loss(recon.float(), flow_rgb.float())
        kl = kl_standard_normal(mu.float(), logvar.float())
        mu32 = mu.float()

        action_loss = mu32.new_zeros(())
        if actions is not None:
            self._check_latent(actions, "actions", b)
            d = self.config.latent_dim
            if action_mask is None:
                mask = torch.ones(b, d, dtype=torch.bool, device=mu.device)
            else:
                if action_mask.dtype != torch.bool or action_mask.shape not in ((b,), (b, d)):
                    raise ValueError(f"action_mask must be a bool tensor [B={b}] (labelled rows) or [B={b}, {d}] "
                                     f"(labelled dims), got {action_mask.dtype} {tuple(action_mask.shape)}")
                mask = action_mask.to(mu.device)
                if mask.ndim == 1:
                    mask = mask[:, None].expand(b, d)
            # a row is labelled if any of its dims is; narrower embodiments label only their native dims
            target = torch.where(mask, actions.to(mu32), torch.zeros_like(mu32))
            sq = torch.where(mask, (mu32 - target).pow(2), torch.zeros_like(mu32)).sum(dim=-1)  # [B]
            rows = mask.any(dim=-1).sum().clamp(min=1)
            action_loss = sq.sum() / rows.to(sq.dtype)
        elif action_mask is not None:
            raise ValueError("action_mask was given without actions")

        loss = recon_loss + self.config.lambda_action * action_loss + self.config.beta_kl * kl
        return dict(loss=loss, recon_loss=recon_loss, action_loss=action_loss, kl=kl, z=z, mu=mu,
                    logvar=logvar, recon=recon)

    @torch.no_grad()
    def latent(self, flow_rgb: torch.Tensor) -> torch.Tensor:
        """The deterministic latent action (mu) [B, latent_dim], for exporting latent-action labels."""
        return self.encode(flow_rgb)[0]

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        out = {"dcae": count(self.dcae), "encoder": count(self.in_norm) + count(self.encoder),
               "decoder": count(self.decoder)}
        out["total"] = sum(out.values())
        return out

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Config JSON (with format_version) + one safetensors file holding DC-AE and MLP weights."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE), metadata={"format": "motus-latent-action",
                                                          "version": str(FORMAT_VERSION)})
        (d / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **self.config.to_dict()},
                                                indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LatentActionVAE:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} not found: not a latent-action VAE folder "
                                        f"(expected {CONFIG_FILE} + {WEIGHTS_FILE})")
        raw = json.loads(cfg_path.read_text())
        version = raw.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{cfg_path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        model = cls(LatentActionConfig.from_dict(raw), load_weights=False)  # the safetensors hold everything
        missing, unexpected = model.load_state_dict(load_file(str(w_path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{w_path}: weights do not match the config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        return model



__all__ = ["LatentActionConfig", "LatentActionVAE", "build_latent_action_config", "full", "kl_standard_normal",
           "tiny", "PRESETS"]
