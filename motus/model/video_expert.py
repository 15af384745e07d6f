"""The video generation expert: diffusers' Wan 2.2 transformer, driven layer by layer.

We keep diffusers' `WanTransformer3DModel` as the container (so real Wan2.2-TI2V-5B weights load unchanged)
and run its blocks ourselves, because the self-attention of every block must become the tri-model joint
attention: the block's own norm1/AdaLN, Q/K/V, QK-norm and 3-D RoPE are applied to the video tokens, the
attention runs over all experts' tokens, then the block's own output projection, T5 cross-attention and FFN.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel

from .joint_attention import apply_rotary
from .layers import full_precision


class VideoExpert(nn.Module):
    def __init__(self, wan_config: dict | None = None, transformer: WanTransformer3DModel | None = None):
        super().__init__()
        self.transformer = transformer if transformer is not None else WanTransformer3DModel(**wan_config)
        c = self.transformer.config
        self.heads, self.head_dim = c.num_attention_heads, c.attention_head_dim
        self.patch_size = tuple(c.patch_size)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    # --- once per forward ---------------------------------------------------------------------------------
    def embed_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """T5 embeddings [B, L, text_dim] -> cross-attention context [B, L, dim]; once per sampling call."""
        return self.transformer.condition_embedder.text_embedder(text_embeds)

    def embed(self, latents: torch.Tensor, t_tokens: torch.Tensor):
        """latents [B, C, F, h, w], t_tokens [B, L] in [0, 1] -> tokens, rotary, temb, tproj."""
        tr = self.transformer
        rotary = tr.rope(latents)
        # the residual stream keeps the weights' dtype (fp32 master weights under bf16 autocast, as Wan does)
        wdtype = tr.patch_embedding.weight.dtype
        x = tr.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous().to(wdtype)
        ce = tr.condition_embedder
        b, n = t_tokens.shape
        with full_precision(latents.device):
            tfeat = ce.timesteps_proj((t_tokens.float() * 1000.0).flatten()).unflatten(0, (b, n))
            temb = ce.time_embedder(tfeat.to(next(ce.time_embedder.parameters()).dtype))
            tproj = ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))  # [B, L, 6, dim]
        return x, rotary, temb, tproj

    def tokens_per_frame(self, h: int, w: int) -> int:
        return (h // self.patch_size[1]) * (w // self.patch_size[2])

    # --- per layer ----------------------------------------------------------------------------------------
    def modulate(self, i: int, tproj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        table = self.blocks[i].scale_shift_table.unsqueeze(0)  # [1, 1, 6, dim]
        return tuple(m.squeeze(2) for m in (table + tproj.float()).chunk(6, dim=2))

    def attn_input(self, i: int, x: torch.Tensor, mod, rotary):
        blk = self.blocks[i]
        h = (blk.norm1(x.float()) * (1 + mod[1]) + mod[0]).type_as(x)
        attn = blk.attn1
        q = attn.norm_q(attn.to_q(h).float()).unflatten(2, (self.heads, -1))  # QK-norm in fp32 (autocast: bf16 in)
        k = attn.norm_k(attn.to_k(h).float()).unflatten(2, (self.heads, -1))
        v = attn.to_v(h).unflatten(2, (self.heads, -1))
        cos, sin = rotary
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attn_residual(self, i: int, x: torch.Tensor, attn_out: torch.Tensor, mod) -> torch.Tensor:
        attn = self.blocks[i].attn1
        out = attn.to_out[1](attn.to_out[0](attn_out.type_as(x)))
        return (x.float() + out * mod[2]).type_as(x)

    def cross_and_ffn(self, i: int, x: torch.Tensor, mod, context: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        h = blk.norm2(x.float()).type_as(x)
        x = x + blk.attn2(h, context, None, None)
        h = (blk.norm3(x.float()) * (1 + mod[4]) + mod[3]).type_as(x)
        return (x.float() + blk.ffn(h).float() * mod[5]).type_as(x)

    # --- once per forward ---------------------------------------------------------------------------------
    def head(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens -> velocity in latent space [B, C, F, h, w]."""
        tr = self.transformer
        shift, scale = (tr.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        x = (tr.norm_out(x.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(x)
        x = tr.proj_out(x)
        b = x.shape[0]
        f, hh, ww = grid
        pt, ph, pw = self.patch_size
        x = x.reshape(b, f, hh, ww, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        _, _, f, h, w = latents.shape
        pt, ph, pw = self.patch_size
        return f // pt, h // ph, w // pw

    def num_tokens(self, latents: torch.Tensor) -> int:
        return math.prod(self.grid(latents))
