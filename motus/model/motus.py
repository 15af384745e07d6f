"""Motus: three experts joined by tri-model joint attention, trained with per-modality rectified flow."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .action_expert import ActionExpert
from .joint_attention import joint_attention
from .modes import get_mode
from .presets import MotusConfig
from .rectified_flow import Generators, add_noise, draw, inference_schedule, sample_timesteps
from .understanding_expert import UnderstandingExpert
from .video_expert import VideoExpert
from .vlm import FrozenVAE, FrozenVLM, UnderstandingContext, _require_dir

log = logging.getLogger(__name__)

CONFIG_FILE = "motus_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
EXPERTS = ("video", "action", "understanding")


@dataclass
class Velocity:
    video: torch.Tensor | None  # [B, C, F, h, w] (the conditioning frame's slot is meaningless)
    action: torch.Tensor | None  # [B, K, action_dim]


@dataclass
class SampleResult:
    mode: str
    video_latents: torch.Tensor | None  # clean input or generated; None when kept at noise
    actions: torch.Tensor | None
    generated: tuple[str, ...]
    steps: int


class MotusModel(nn.Module):
    def __init__(self, config: MotusConfig, *, with_vlm: bool = True, with_vae: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        w = config.weights or {}
        if config.preset == "full" and not all(w.get(k) for k in ("video", "vae", "vlm")):
            if torch.empty(0).device.type != "meta":
                warnings.warn("full preset without local weights for every component: those start random",
                              stacklevel=2)
        if w.get("video"):
            from diffusers import WanTransformer3DModel

            p = _require_dir(w["video"], "weights.video", "a diffusers WanTransformer3DModel folder or a pipeline root with transformer/")
            sub = "transformer" if (p / "transformer" / "config.json").exists() else None
            self.video = VideoExpert(transformer=WanTransformer3DModel.from_pretrained(str(p), subfolder=sub, local_files_only=True))
        else:
            self.video = VideoExpert(config.video)
        heads, head_dim = config.joint_heads, config.joint_head_dim
        self.action = ActionExpert(config.action, heads, head_dim)
        self.understanding = UnderstandingExpert(config.understanding, heads, head_dim)
        self.vlm = FrozenVLM(config.vlm, w.get("vlm")) if with_vlm else None
        self.vae = FrozenVAE(config.vae, w.get("vae")) if with_vae else None
        self.gradient_checkpointing = False

    # --- parameter groups ---------------------------------------------------------------------------------
    def expert(self, name: str) -> nn.Module:
        if name not in EXPERTS:
            raise ValueError(f"unknown expert '{name}'; expected one of {EXPERTS}")
        return getattr(self, name)

    def set_trainable(self, experts: list[str] | tuple[str, ...]) -> None:
        """Only the named experts receive gradients (Stage 1: ['video']). The VLM and VAE never do."""
        for name in EXPERTS:
            self.expert(name).requires_grad_(name in experts)

    def parameter_counts(self) -> dict[str, int]:
        counts = {name: sum(p.numel() for p in self.expert(name).parameters()) for name in EXPERTS}
        if self.vlm is not None:
            counts["vlm"] = sum(p.numel() for p in self.vlm.parameters())
        if self.vae is not None:
            counts["vae"] = sum(p.numel() for p in self.vae.parameters())
        return counts

    # --- conditioning -------------------------------------------------------------------------------------
    def encode_understanding(self, images: torch.Tensor, instructions: list[str]) -> UnderstandingContext:
        """Run the frozen VLM once on the conditioning images and instructions."""
        if self.vlm is None:
            raise RuntimeError("this model was built without its VLM (with_vlm=False)")
        return self.vlm.encode(self.vlm.prepare(images, instructions, self.config.vlm_image_size))

    # --- the network --------------------------------------------------------------------------------------
    def forward(
        self,
        video_latents: torch.Tensor,
        t_video: torch.Tensor,
        text_embeds: torch.Tensor,
        actions: torch.Tensor | None = None,
        t_action: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        understanding: UnderstandingContext | None = None,
        text_context: torch.Tensor | None = None,
    ) -> Velocity:
        """Velocity for noised video latents and (optionally) actions.

        t_video: [B, F] per latent frame (0 for the conditioning frame); t_action: [B].
        Absent actions / understanding drop those experts' tokens from the joint attention (Stage 1 trains
        the video expert alone). `text_context` lets a sampler embed the T5 text once per call.
        """
        cfg = self.config
        self._check_video(video_latents, "video_latents")
        b = video_latents.shape[0]
        if t_video.shape != (b, video_latents.shape[2]):
            raise ValueError(f"t_video must be [B, F] = {(b, video_latents.shape[2])}, got {tuple(t_video.shape)}")
        if text_context is None:
            text_context = self.video.embed_text(self._check_text(text_embeds, b))
        _, _, f, h, w = video_latents.shape
        t_tokens = t_video.repeat_interleave(self.video.tokens_per_frame(h, w), dim=1)
        xv, rotary, temb_v, tproj_v = self.video.embed(video_latents, t_tokens)

        xa = tproj_a = temb_a = None
        if actions is not None:
            self._check_actions(actions, state, b)
            if t_action is None or t_action.shape != (b,):
                raise ValueError(f"t_action must be [B] = ({b},) when actions are given")
            xa = self.action.encoder(actions, state)
            temb_a, tproj_a = self.action.embed_time(t_action)

        xu = mask = None
        if understanding is not None:
            if understanding.features.shape[0] != b or understanding.features.shape[-1] != cfg.understanding.vlm_hidden:
                raise ValueError(f"understanding features must be [B={b}, L, {cfg.understanding.vlm_hidden}], "
                                 f"got {tuple(understanding.features.shape)}")
            xu = self.understanding.adapter(understanding.features.to(xv.dtype)).to(xv.dtype)
            if not bool(understanding.mask.all()):
                ones = torch.ones(b, xv.shape[1] + (0 if xa is None else xa.shape[1]), dtype=torch.bool, device=xv.device)
                mask = torch.cat([ones, understanding.mask.to(xv.device)], dim=1)

        for i in range(cfg.num_layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                xv, xa, xu = checkpoint(self._layer, i, xv, xa, xu, rotary, tproj_v, tproj_a, text_context, mask,
                                        use_reentrant=False)
            else:
                xv, xa, xu = self._layer(i, xv, xa, xu, rotary, tproj_v, tproj_a, text_context, mask)

        v_video = self.video.head(xv, temb_v, self.video.grid(video_latents))
        v_action = None
        if xa is not None:
            v_action = self.action.decoder(xa[:, self.action.encoder.action_slice(actions.shape[1])], temb_a)
        return Velocity(v_video, v_action)

    def _layer(self, i, xv, xa, xu, rotary, tproj_v, tproj_a, context, mask):
        vmod = self.video.modulate(i, tproj_v)
        qkvs = [self.video.attn_input(i, xv, vmod, rotary)]
        if xa is not None:
            ablk = self.action.blocks[i]
            amod = ablk.modulate(tproj_a)
            qkvs.append(ablk.attn_input(xa, amod))
        if xu is not None:
            ublk = self.understanding.blocks[i]
            qkvs.append(ublk.attn_input(xu))
        outs = joint_attention(qkvs, mask)
        xv = self.video.attn_residual(i, xv, outs[0], vmod)
        xv = self.video.cross_and_ffn(i, xv, vmod, context)
        k = 1
        if xa is not None:
            xa = ablk.ffn_residual(ablk.attn_residual(xa, outs[k], amod), amod)
            k += 1
        if xu is not None:
            xu = ublk.ffn_residual(ublk.attn_residual(xu, outs[k]))
        return xv, xa, xu

    # --- training objective -------------------------------------------------------------------------------
    def training_loss(
        self,
        video_latents: torch.Tensor,
        text_embeds: torch.Tensor,
        actions: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        understanding: UnderstandingContext | None = None,
        generator: Generators = None,
        reduction: str = "mean",
        t: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """w_v * MSE(video velocity on FUTURE frames) + w_a * MSE(action velocity), reduced in fp32.

        The conditioning frame stays clean and is excluded from the video loss's numerator AND denominator.
        reduction "none" returns each sample's losses [B] (a list of generators, one per sample, then makes a
        sample's timesteps and noise independent of its batch-mates too). `t` fixes both modalities' timestep
        instead of sampling it: validation measures the loss at fixed t with this same code.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got '{reduction}'")
        fc = self.config.flow
        self._check_video(video_latents, "video_latents")
        b, _, f, _, _ = video_latents.shape
        dev = video_latents.device
        if t is None:
            t_v = sample_timesteps(fc, b, generator, dev)
            t_a = sample_timesteps(fc, b, generator, dev)
        else:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"t must be in [0, 1], got {t}")
            t_v = t_a = torch.full((b,), float(t), device=dev)
        eps_v = draw("randn", video_latents.shape, generator, dev, video_latents.dtype)
        x0_future = video_latents[:, :, 1:]
        noisy = torch.cat([video_latents[:, :, :1], add_noise(x0_future, eps_v[:, :, 1:], t_v)], dim=2)
        t_frames = torch.cat([torch.zeros(b, 1, device=dev), t_v[:, None].expand(b, f - 1)], dim=1)

        noisy_a = eps_a = None
        if actions is not None:
            eps_a = draw("randn", actions.shape, generator, dev, actions.dtype)
            noisy_a = add_noise(actions, eps_a, t_a)

        vel = self.forward(noisy, t_frames, text_embeds, noisy_a, t_a if actions is not None else None,
                           state, understanding)
        def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            sq = (pred.float() - target.float()) ** 2
            return sq.mean() if reduction == "mean" else sq.flatten(1).mean(1)

        video_loss = mse(vel.video[:, :, 1:], eps_v[:, :, 1:] - x0_future)
        out = {"video_loss": video_loss, "t_video": t_v}
        loss = fc.video_loss_weight * video_loss
        if actions is not None:
            action_loss = mse(vel.action, eps_a - actions)
            loss = loss + fc.action_loss_weight * action_loss
            out.update(action_loss=action_loss, t_action=t_a)
        out["loss"] = loss
        return out

    # --- inference: one API for the five modes ------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        mode: str,
        video_latents: torch.Tensor,
        text_embeds: torch.Tensor,
        actions: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        understanding: UnderstandingContext | None = None,
        steps: int | None = None,
        generator: Generators = None,
        action_stream: bool = True,
        start: str = "noise",
    ) -> SampleResult:
        """video_latents: [B, C, F, h, w]; frame 0 is the observation. Its future frames are read only when
        the mode keeps video clean (idm). Clean inputs are never modified; understanding and text are embedded
        once for all Euler steps. `action_stream=False` leaves the action tokens out entirely (a video-only
        Stage 1 model in vgm mode) instead of holding them at noise. `start="mean"` starts what is generated at
        the noise's mean (zeros) instead of a draw: deterministic (see `estimate_x0`)."""
        m = get_mode(mode)
        if start not in ("noise", "mean"):
            raise ValueError(f"start must be 'noise' or 'mean', got {start!r}")
        noise = "zeros" if start == "mean" else "randn"
        cfg = self.config
        self._check_video(video_latents, "video_latents")
        b, _, f, _, _ = video_latents.shape
        dev = video_latents.device
        if m.action == "clean" and actions is None:
            raise ValueError(f"mode '{mode}' conditions on actions: pass actions [B, {cfg.action.chunk}, {cfg.action.action_dim}]")
        if actions is not None:
            self._check_actions(actions, state, b)
        steps = steps or cfg.flow.inference_steps
        schedule = inference_schedule(steps, cfg.flow.inference_shift).to(dev)

        obs = video_latents[:, :, :1]
        if m.video == "clean":
            future = video_latents[:, :, 1:]
        else:
            shape = (b, video_latents.shape[1], f - 1, *video_latents.shape[3:])
            future = draw(noise, shape, generator, dev, video_latents.dtype)
        a_shape = (b, cfg.action.chunk, cfg.action.action_dim)
        if m.action == "clean":
            act = actions
        else:
            act = draw(noise, a_shape, generator, dev, video_latents.dtype)
        if not action_stream:
            if m.action != "noise":
                raise ValueError(f"mode '{mode}' uses actions; action_stream=False only suits modes that ignore them (vgm)")
            act = None
        elif cfg.action.encoder_mode == "finetune" and state is None:
            raise ValueError("the action expert is in finetune mode: sampling needs `state` [B, state_dim]")

        context = self.video.embed_text(self._check_text(text_embeds, b))
        ones = torch.ones(b, device=dev)
        fixed_t = {"clean": 0.0, "noise": 1.0}
        for i in range(steps):
            t_cur, t_next = schedule[i], schedule[i + 1]
            tv = ones * (t_cur if m.video == "generate" else fixed_t[m.video])
            ta = ones * (t_cur if m.action == "generate" else fixed_t[m.action])
            t_frames = torch.cat([torch.zeros(b, 1, device=dev), tv[:, None].expand(b, f - 1)], dim=1)
            vel = self.forward(torch.cat([obs, future], dim=2), t_frames, text_embeds, act,
                               ta if act is not None else None, state if act is not None else None,
                               understanding, text_context=context)
            dt = t_next - t_cur  # negative: integrate from noise (t=1) to data (t=0)
            if m.video == "generate":
                future = future + dt * vel.video[:, :, 1:]
            if m.action == "generate":
                act = act + dt * vel.action

        out_video = None if m.video == "noise" else torch.cat([obs, future], dim=2)
        if m.video == "clean":
            out_video = video_latents.clone()
        out_actions = None if m.action == "noise" else (actions.clone() if m.action == "clean" else act)
        generated = tuple(k for k, r in (("video", m.video), ("action", m.action)) if r == "generate")
        return SampleResult(mode, out_video, out_actions, generated, steps)

    def estimate_x0(self, mode: str, video_latents: torch.Tensor, text_embeds: torch.Tensor,
                    **kwargs: Any) -> SampleResult:
        """The clean sample predicted in one step from t = 1 at the noise's mean: x0 = 0 - v(0, t=1).

        Deterministic (no draw), and for a model that has learned the flow it is the conditional mean of the data,
        the prediction with the least squared error: a held-out number that moves only with the weights, where a
        sampled one also carries the noise draw's spread (about twice the conditional variance)."""
        return self.sample(mode, video_latents, text_embeds, steps=1, start="mean", **kwargs)

    # --- input checks: name the expected value, never broadcast silently ------------------------------------
    def _check_video(self, x: torch.Tensor, name: str) -> None:
        c, f, h, w = self.config.latent_shape
        if x.dim() != 5 or x.shape[1] != c or x.shape[3:] != (h, w) or x.shape[2] < 2:
            raise ValueError(f"{name} must be [B, {c}, F>=2, {h}, {w}] (preset '{self.config.preset}'), "
                             f"got {tuple(x.shape)}")

    def _check_actions(self, actions: torch.Tensor, state: torch.Tensor | None, b: int) -> None:
        a = self.config.action
        if actions.shape != (b, a.chunk, a.action_dim):
            raise ValueError(f"actions must be [B={b}, chunk={a.chunk}, action_dim={a.action_dim}], "
                             f"got {tuple(actions.shape)}")
        if a.encoder_mode == "finetune":
            if state is None or state.shape != (b, a.state_dim):
                got = None if state is None else tuple(state.shape)
                raise ValueError(f"state must be [B={b}, state_dim={a.state_dim}] in finetune mode, got {got}")
        elif state is not None:
            raise ValueError("the action expert is in pretrain mode (latent actions, no state): pass state=None")

    def _check_text(self, text: torch.Tensor, b: int) -> torch.Tensor:
        """T5 features, zero-padded to exactly `text_len` tokens as Wan pads them: the cross-attention has no
        mask, so a fixed length is what keeps a sample's output independent of its batch-mates' instructions."""
        d, n = self.config.video["text_dim"], self.config.text_len
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != d:
            raise ValueError(f"text_embeds must be [B={b}, L, text_dim={d}] (T5 features), got {tuple(text.shape)}")
        if text.shape[1] > n:
            raise ValueError(f"text_embeds has {text.shape[1]} tokens, more than the model's text_len={n}")
        return torch.nn.functional.pad(text, (0, 0, 0, n - text.shape[1])) if text.shape[1] < n else text

    # --- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config + safetensors of the three experts; the frozen VLM/VAE are written only when they have no
        local weights path to come back from (random tiny ones), so checkpoints never copy the 2B VLM."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {f"{n}.{k}": v.detach().contiguous().cpu() for n in EXPERTS for k, v in self.expert(n).state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE), metadata={"format": "motus", "version": str(FORMAT_VERSION)})
        w = self.config.weights or {}
        for name in ("vlm", "vae"):
            mod = getattr(self, name)
            if mod is not None and not w.get(name):
                save_file({k: v.detach().contiguous().cpu() for k, v in mod.state_dict().items()},
                          str(d / f"{name}.safetensors"))
        (d / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **self.config.to_dict()}, indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> MotusModel:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path = d / CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found: not a Motus model folder (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
        raw = json.loads(cfg_path.read_text())
        version = raw.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{cfg_path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        model = cls(MotusConfig.from_dict(raw), **kwargs)
        state = load_file(str(d / WEIGHTS_FILE))
        for n in EXPERTS:
            sub = {k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")}
            missing, unexpected = model.expert(n).load_state_dict(sub, strict=False)
            if missing or unexpected:
                raise ValueError(f"{d / WEIGHTS_FILE}: expert '{n}' does not match its config "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        for name in ("vlm", "vae"):
            mod, f = getattr(model, name), d / f"{name}.safetensors"
            if mod is not None and f.exists():
                mod.load_state_dict(load_file(str(f)))
        return model
