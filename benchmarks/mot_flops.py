"""Analytic FLOP count of one Motus (MoT) forward and of one training step, per expert.

    python benchmarks/mot_flops.py [--preset full] [--batch 1] [--instruction-tokens 32] [--json]

What is counted is what `torch.utils.flop_counter.FlopCounterMode` counts, so the two can be compared exactly:
every matmul (mm / addmm / bmm: 2*m*n*k), every convolution (2 * outputs * kernel volume * c_in), and every
scaled-dot-product attention (2*s_q*s_k*d for the scores plus the same for the values, per head, with no
causal discount). Norms, activations, RoPE, residual adds and the loss are not counted (FlopCounterMode does
not count them either; they are a few per cent of the runtime and well under 1 % of these FLOPs).

Tokens per sample:
  video          latent_frames * (latent_h / patch_h) * (latent_w / patch_w)
  action         finetune (Stage 3): 1 state + chunk actions + num_registers; pretrain (Stage 2): chunk
  understanding  the frozen VLM's sequence: image tokens ((side / (patch * merge))^2) + 2 vision specials
                 + the instruction's tokens (a stated parameter, default 32)
  text           text_len T5 tokens (zero-padded to exactly this length, as Wan 2.2 was trained)
Stage 1 runs the video expert alone (no action or understanding tokens); Stages 2 and 3 run all three.

A training step counts forward + backward = 3x the forward (each matmul's backward computes the gradient of
its input and of its weight); with activation checkpointing the forward is recomputed once more: 4x. The
frozen VLM's forward is counted separately (`vlm_forward_flops`) and is not part of the MoT total; the T5
encoder is assumed pre-encoded and the VAE is not counted.

The token rules are `motus.model.tokens`, the ones `motus model memory` uses; this file has no other dependency
on the project, so it travels next to the GPU check script (`make gpu-check`), where `motus` is installed.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

from motus.model.presets import MotusConfig
from motus.model.tokens import (  # the token rules the memory estimate uses too  # noqa: F401 - re-exported
    DEFAULT_INSTRUCTION_TOKENS,
    STAGES,
    Tokens,
    action_tokens,
    check_stage,
    encoder_mode_for,
    stage_tokens,
    understanding_tokens,
    video_tokens,
    vlm_image_side,
    vlm_image_tokens,
)

EXPERTS = ("video", "action", "understanding")


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def mot_forward_breakdown(cfg: MotusConfig, batch_size: int, stage: int,
                          instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS,
                          tokens: Tokens | None = None) -> dict[str, int]:
    """FLOPs of one MoT forward, keyed 'expert.part'. Joint-attention products are charged to the expert whose
    tokens are the queries (so the per-expert sums add up to the total). `tokens` overrides the stage's set
    (e.g. a different instruction length measured from a real batch)."""
    check_stage(stage)
    t = tokens or stage_tokens(cfg, stage, instruction_tokens)
    b = int(batch_size)
    v = cfg.video
    d = int(v["num_attention_heads"]) * int(v["attention_head_dim"])  # Wan: model width = heads x head_dim
    dj = cfg.joint_heads * cfg.joint_head_dim  # the joint attention's head space (the video expert's)
    layers = cfg.num_layers
    patch = math.prod(int(p) for p in v["patch_size"])
    n, nj, nt = t.video, t.joint, t.text
    out: dict[str, int] = {}

    # video expert: once per forward
    out["video.patch_embed"] = _mm(n, int(v["in_channels"]) * patch, d)
    # Wan 2.2 TI2V embeds the timestep per token: time MLP + 6-way AdaLN projection for every video token
    out["video.time_embed"] = _mm(n, int(v["freq_dim"]), d) + _mm(n, d, d) + _mm(n, d, 6 * d)
    out["video.text_embed"] = _mm(nt, int(v["text_dim"]), d) + _mm(nt, d, d)
    out["video.head"] = _mm(n, d, int(v["out_channels"]) * patch)
    # video expert: per layer
    out["video.joint_qkvo"] = layers * 4 * _mm(n, d, d)
    out["video.joint_attention"] = layers * 2 * _mm(n, dj, nj)
    out["video.cross_qkvo"] = layers * (2 * _mm(n, d, d) + 2 * _mm(nt, d, d))
    out["video.cross_attention"] = layers * 2 * _mm(n, d, nt)
    out["video.ffn"] = layers * 2 * _mm(n, d, int(v["ffn_dim"]))

    if t.action:
        a = cfg.action
        k = a.chunk
        finetune = encoder_mode_for(stage) == "finetune"
        out["action.encoder"] = _mm(k, a.action_dim, a.dim) + 2 * _mm(k, a.dim, a.dim)
        if finetune:
            out["action.encoder"] += _mm(1, a.state_dim, a.dim) + 2 * _mm(1, a.dim, a.dim)
        out["action.time_embed"] = _mm(1, a.freq_dim, a.dim) + _mm(1, a.dim, a.dim) + _mm(1, a.dim, 6 * a.dim)
        out["action.decoder"] = _mm(k, a.dim, a.action_dim)
        out["action.joint_qkvo"] = layers * (_mm(t.action, a.dim, 3 * dj) + _mm(t.action, dj, a.dim))
        out["action.joint_attention"] = layers * 2 * _mm(t.action, dj, nj)
        out["action.ffn"] = layers * 2 * _mm(t.action, a.dim, a.ffn_dim)

    if t.understanding:
        u = cfg.understanding
        nu = t.understanding
        out["understanding.adapter"] = (_mm(nu, u.vlm_hidden, u.dim)
                                        + (u.adapter_depth - 1) * _mm(nu, u.dim, u.dim))
        out["understanding.joint_qkvo"] = layers * (_mm(nu, u.dim, 3 * dj) + _mm(nu, dj, u.dim))
        out["understanding.joint_attention"] = layers * 2 * _mm(nu, dj, nj)
        out["understanding.ffn"] = layers * 2 * _mm(nu, u.dim, u.ffn_dim)
    return {key: b * val for key, val in out.items()}


def _per_expert(breakdown: dict[str, int]) -> dict[str, int]:
    out = {e: sum(v for k, v in breakdown.items() if k.startswith(e + ".")) for e in EXPERTS}
    out["total"] = sum(out.values())
    return out


def mot_forward_flops(cfg: MotusConfig, batch_size: int, stage: int,
                      instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS,
                      tokens: Tokens | None = None) -> dict[str, int]:
    """{'video', 'action', 'understanding', 'total'}: FLOPs of one MoT forward for `batch_size` samples."""
    return _per_expert(mot_forward_breakdown(cfg, batch_size, stage, instruction_tokens, tokens))


def training_step_flops(cfg: MotusConfig, batch_size: int, stage: int, activation_checkpointing: bool = False,
                        instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS,
                        tokens: Tokens | None = None) -> dict[str, int]:
    """Forward + backward (3x the forward; 4x with activation checkpointing, which reruns the forward).

    The convention slightly over-counts: the first matmul of each input path has no input gradient to compute,
    and this model checkpoints only the joint layers (the embeddings and heads are not recomputed). For the
    full preset the corrections are under 1 %; `exact_training_step_flops` applies them."""
    factor = 4 if activation_checkpointing else 3
    fwd = mot_forward_flops(cfg, batch_size, stage, instruction_tokens, tokens)
    return {k: factor * v for k, v in fwd.items()}


_PER_LAYER = ("joint_qkvo", "joint_attention", "cross_qkvo", "cross_attention", "ffn")


def exact_training_step_flops(cfg: MotusConfig, batch_size: int, stage: int,
                              activation_checkpointing: bool = False,
                              instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS,
                              tokens: Tokens | None = None) -> dict[str, int]:
    """The training step as FlopCounterMode counts it on this code: 2x backward for every matmul and attention
    except the input layers' (1x: no input gradient), plus the per-layer forward again when checkpointing."""
    check_stage(stage)
    t = tokens or stage_tokens(cfg, stage, instruction_tokens)
    fwd = mot_forward_breakdown(cfg, batch_size, stage, tokens=t)
    b = int(batch_size)
    v, a, u = cfg.video, cfg.action, cfg.understanding
    d = int(v["num_attention_heads"]) * int(v["attention_head_dim"])
    # matmuls whose input never requires a gradient (data, timestep features, frozen-VLM features): their
    # backward computes the weight gradient only (1x the forward, not 2x)
    first = {
        "video.patch_embed": fwd["video.patch_embed"],
        "video.text_embed": b * _mm(t.text, int(v["text_dim"]), d),
        "video.time_embed": b * _mm(t.video, int(v["freq_dim"]), d),
    }
    if t.action:
        finetune = encoder_mode_for(stage) == "finetune"
        state_in = _mm(1, a.state_dim, a.dim) if finetune else 0
        first["action.encoder"] = b * (_mm(a.chunk, a.action_dim, a.dim) + state_in)
        first["action.time_embed"] = b * _mm(1, a.freq_dim, a.dim)
    if t.understanding:
        first["understanding.adapter"] = b * _mm(t.understanding, u.vlm_hidden, u.dim)
    step: dict[str, int] = {}
    for key, f in fwd.items():
        no_input_grad = first.get(key, 0)
        recompute = f if activation_checkpointing and key.split(".", 1)[1] in _PER_LAYER else 0
        step[key] = 3 * f - no_input_grad + recompute
    if t.understanding:
        nu = t.understanding
        out_proj = b * _mm(nu, cfg.joint_heads * cfg.joint_head_dim, u.dim)
        ffn_down = b * _mm(nu, u.ffn_dim, u.dim)
        # The last layer's understanding tokens feed nothing (no head reads them): that layer's understanding
        # out-projection and FFN get no backward at all (and their weights never get a gradient).
        step["understanding.joint_qkvo"] -= 2 * out_proj
        step["understanding.ffn"] -= 2 * 2 * ffn_down
        if activation_checkpointing:
            # torch's checkpoint stops recomputing once every saved tensor is back: the understanding FFN's
            # down-projection, the layer's last matmul, saves only its input, so it is never recomputed.
            step["understanding.ffn"] -= cfg.num_layers * ffn_down
    return _per_expert(step)


def vlm_forward_flops(cfg: MotusConfig, batch_size: int,
                      instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS) -> dict[str, int]:
    """The frozen Qwen3-VL forward on one image + instruction per sample (no LM head: its last hidden states
    feed the understanding expert). {'vision', 'language', 'total'}."""
    vc, tc = cfg.vlm["vision_config"], cfg.vlm["text_config"]
    b = int(batch_size)
    p, m, tp = int(vc["patch_size"]), int(vc["spatial_merge_size"]), int(vc["temporal_patch_size"])
    dv, iv, out_h = int(vc["hidden_size"]), int(vc["intermediate_size"]), int(vc["out_hidden_size"])
    patches = (vlm_image_side(cfg) // p) ** 2  # one image = one temporal patch (the frame repeated tp times)
    merged = patches // (m * m)
    vision = _mm(patches, 3 * tp * p * p, dv)  # Conv3d patch embedding
    per_block = (_mm(patches, dv, 3 * dv) + _mm(patches, dv, dv) + 2 * _mm(patches, dv, patches)
                 + _mm(patches, dv, iv) + _mm(patches, iv, dv))
    vision += int(vc["depth"]) * per_block
    mergers = 1 + len(vc.get("deepstack_visual_indexes", []))
    vision += mergers * (_mm(merged, m * m * dv, m * m * dv) + _mm(merged, m * m * dv, out_h))

    h, inter = int(tc["hidden_size"]), int(tc["intermediate_size"])
    heads, kv = int(tc["num_attention_heads"]), int(tc["num_key_value_heads"])
    hd = int(tc.get("head_dim") or h // heads)
    n = understanding_tokens(cfg, instruction_tokens)
    per_layer = (_mm(n, h, heads * hd) + 2 * _mm(n, h, kv * hd) + _mm(n, heads * hd, h)
                 + 2 * _mm(n, hd * heads, n) + 3 * _mm(n, h, inter))
    language = int(tc["num_hidden_layers"]) * per_layer
    return {"vision": b * vision, "language": b * language, "total": b * (vision + language)}


def per_sample_report(cfg: MotusConfig, instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS,
                      batch_size: int = 1) -> dict[str, dict]:
    """Per stage: tokens, forward and training-step FLOPs (with and without checkpointing)."""
    rep: dict[str, dict] = {}
    for stage in STAGES:
        rep[f"stage{stage}"] = {
            "tokens": asdict(stage_tokens(cfg, stage, instruction_tokens)),
            "forward": mot_forward_flops(cfg, batch_size, stage, instruction_tokens),
            "train_step": training_step_flops(cfg, batch_size, stage, False, instruction_tokens),
            "train_step_checkpointed": training_step_flops(cfg, batch_size, stage, True, instruction_tokens),
            "exact_train_step_checkpointed": exact_training_step_flops(cfg, batch_size, stage, True,
                                                                       instruction_tokens),
            "vlm_forward": vlm_forward_flops(cfg, batch_size, instruction_tokens) if stage > 1 else None,
        }
    return rep


def _fmt(x: float) -> str:
    return f"{x / 1e12:9.3f} TFLOP"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--geometry", default=None, help="a named geometry (robotwin, ac-one, tiny)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--instruction-tokens", type=int, default=DEFAULT_INSTRUCTION_TOKENS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from motus.model.presets import build_config

    cfg = build_config(args.preset)
    if args.geometry:
        cfg.apply_geometry(args.geometry)
        cfg.validate()
    rep = per_sample_report(cfg, args.instruction_tokens, args.batch)
    if args.json:
        print(json.dumps({"preset": cfg.preset, "geometry": cfg.geometry, "batch_size": args.batch,
                          "instruction_tokens": args.instruction_tokens, "stages": rep}, indent=2))
        return
    print(f"preset {cfg.preset} ({cfg.geometry}), batch {args.batch}, "
          f"instruction {args.instruction_tokens} tokens")
    for name, r in rep.items():
        tk = r["tokens"]
        print(f"{name}: tokens video {tk['video']} action {tk['action']} understanding {tk['understanding']} "
              f"text {tk['text']} (joint {tk['video'] + tk['action'] + tk['understanding']})")
        for e in (*EXPERTS, "total"):
            print(f"  forward {e:14s} {_fmt(r['forward'][e])}")
        print(f"  train step (3x)        {_fmt(r['train_step']['total'])}")
        print(f"  train step ckpt (4x)   {_fmt(r['train_step_checkpointed']['total'])}  "
              f"(exact on this code: {_fmt(r['exact_train_step_checkpointed']['total'])})")
        if r["vlm_forward"]:
            print(f"  frozen VLM forward     {_fmt(r['vlm_forward']['total'])} (not in the MoT total)")


if __name__ == "__main__":
    main()
