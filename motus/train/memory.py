"""Per-device GPU memory of one Motus training step: an estimate, with what it assumes stated in words.

`estimate_training_memory(cfg, stage=3, batch_size=2, zero_stage=2, offload=True)` -> `MemoryEstimate`;
`check_fits(estimate, device_bytes)` raises a ValueError naming the settings and the next one to try.

The model it follows is this platform's training step (motus/train/stage.py, motus/train/precision.py):
fp32 module parameters that are also the master weights, the forward under torch.autocast(bfloat16) with the
timestep MLPs in fp32 and the residual stream in fp32, fp32 gradients, torch AdamW (fp32 exp_avg and
exp_avg_sq), DeepSpeed ZeRO 0-3 with optional offload of the optimizer to the CPU. The frozen VLM (bf16), the
Wan VAE (fp32) and, unless pre-encoded, the umT5-XXL text encoder (bf16) sit on the same device.

Parameter counts are exact (the model is built on the meta device). Activation bytes are what autograd keeps
on this code path, per token and per layer: the coefficients below were read off torch's saved-tensor hooks
on the CPU autocast path (tests/model/test_memory.py re-measures them). CUDA kernels (flash attention, fused norms)
keep slightly different sets, and the caching allocator adds fragmentation, so the total is an estimate:
keep a few GB of headroom.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..model.presets import MotusConfig
from ..model.tokens import DEFAULT_INSTRUCTION_TOKENS, Tokens, stage_tokens
from ..model.tokens import check_stage as _check_stage

GiB = 1024**3
ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("bf16", "fp32")

# DeepSpeed defaults (deepspeed/runtime/zero/config.py) the loop does not override.
DS_REDUCE_BUCKET = 500_000_000  # elements: the gradient bucket ZeRO 2/3 reduce through (fp32 here)
DS_PREFETCH_BUCKET = 50_000_000  # elements: ZeRO-3 parameters fetched ahead of use
FIXED_ALLOWANCE = int(1.5 * GiB)  # CUDA context, cuBLAS/cuDNN workspaces, NCCL: outside torch's counters
FRAGMENTATION = 0.05  # caching-allocator slack on the memory that comes and goes every step

# umT5-XXL encoder (Wan 2.2's text encoder), for when T5 is not pre-encoded.
UMT5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=256384,
                feed_forward_proj="gated-gelu")


def trained_experts(stage: int) -> tuple[str, ...]:
    """Stage 1 trains the video expert alone; Stages 2 and 3 all three (the VLM, VAE and T5 stay frozen)."""
    return ("video",) if _check_stage(stage) == 1 else ("video", "action", "understanding")



# --- parameters ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _parameter_counts(cfg_json: str) -> dict[str, int]:
    import torch

    from ..model.motus import MotusModel

    cfg = MotusConfig.from_dict(json.loads(cfg_json))
    cfg.weights = {k: None for k in cfg.weights}  # meta device: shapes come from the config alone
    with torch.device("meta"):
        model = MotusModel(cfg)
    counts = model.parameter_counts()
    # the largest single layer of each expert: what ZeRO-3 gathers at once and what one recompute casts
    counts["video_layer"] = sum(p.numel() for p in model.video.blocks[0].parameters())
    counts["action_layer"] = sum(p.numel() for p in model.action.blocks[0].parameters())
    counts["understanding_layer"] = sum(p.numel() for p in model.understanding.blocks[0].parameters())
    return counts


def parameter_counts(cfg: MotusConfig) -> dict[str, int]:
    """Exact counts per component (video, action, understanding, vlm, vae) from a meta-device build."""
    counts = _parameter_counts(json.dumps(cfg.to_dict(), sort_keys=True))
    return {k: counts[k] for k in ("video", "action", "understanding", "vlm", "vae")}


@functools.lru_cache(maxsize=1)
def text_encoder_parameters() -> int:
    """umT5-XXL encoder parameters (built on the meta device from its published shape)."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        enc = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    return sum(p.numel() for p in enc.parameters())


# --- activations -----------------------------------------------------------------------------------------
# Bytes autograd keeps per token per joint layer (D = video width = joint head space Dj, F = FFN width,
# H = heads; a/u = action/understanding expert). Read off saved-tensor hooks on this code; see the module doc.
#   bf16: video: fp32 AdaLN table (24D), fp32 residuals and norm outputs (28D), fp32 upcasts kept by the
#         Q/K RMSNorms and the fp32 FFN output (16D), RMSNorm products (12D), bf16 inputs of the 7 linears
#         and of the cross attention (18D), FFN hidden twice in bf16 (4F); text: cross-attention K/V and the
#         K-norm in fp32 (12D); every joint token: q, k, v, out in bf16 (8Dj) + logsumexp.
#   fp32: the same tensors with every bf16 copy in fp32 (no casts, so fewer distinct copies of some).
_LAYER_COEF = {
    #          video (D, F, const)   text  joint   action (Da, Fa, Dj)   understanding (Du, Fu, Dj)
    "bf16": dict(v=(98, 4, 36), t=12, j=8, a=(28, 4, 18), u=(12, 4, 18)),
    "fp32": dict(v=(108, 8, 36), t=16, j=16, a=(32, 8, 24), u=(16, 8, 24)),
}


@dataclass(frozen=True)
class Activations:
    """Bytes for `batch_size` samples (one device)."""

    per_layer: int  # everything one joint layer keeps for its backward (no checkpointing)
    non_layer: int  # embeddings, time MLPs, text projection, heads, loss: kept in both modes
    checkpoint_inputs_per_layer: int  # what a checkpointed layer keeps: its fp32 residual inputs
    checkpoint_shared: int  # checkpointed-only: the per-token time projection, held as a checkpoint input
    layers: int

    @property
    def full(self) -> int:
        return self.layers * self.per_layer + self.non_layer

    @property
    def checkpointed(self) -> int:
        """Kept through the forward with checkpointing (the recomputed layer's own activations come and go in
        the backward and are counted there)."""
        return self.layers * self.checkpoint_inputs_per_layer + self.checkpoint_shared + self.non_layer


def activation_bytes(cfg: MotusConfig, stage: int, batch_size: int, precision: str = "bf16",
                     instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS,
                     tokens: Tokens | None = None) -> Activations:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; expected one of {list(PRECISIONS)}")
    t = tokens or stage_tokens(cfg, stage, instruction_tokens)
    c = _LAYER_COEF[precision]
    v, a, u = cfg.video, cfg.action, cfg.understanding
    d = cfg.joint_heads * cfg.joint_head_dim
    heads = cfg.joint_heads
    f = int(v["ffn_dim"])
    lse = 4 * heads  # fp32 logsumexp per query token per head, kept by flash attention
    per = t.video * (c["v"][0] * d + c["v"][1] * f + c["v"][2] + lse)  # + lse of the cross attention
    per += t.text * (c["t"] * d + 4)
    per += t.joint * (c["j"] * d + lse)
    if t.action:
        per += t.action * (c["a"][0] * a.dim + c["a"][1] * a.ffn_dim + c["a"][2] * d + 24) + 32 * a.dim
    if t.understanding:
        per += t.understanding * (c["u"][0] * u.dim + c["u"][1] * u.ffn_dim + c["u"][2] * d + 24)

    lowp = 2 if precision == "bf16" else 4
    patch = math.prod(int(p) for p in v["patch_size"])
    latent_vals = int(v["in_channels"]) * patch  # latent values per video token
    # once per forward: time MLP per video token (fp32: sinusoid + 4 hidden), input latents, the final
    # residual, the head's norm/modulation/projection, the fp32 loss terms; the text projection; the expert
    # encoders, adapters and the action decoder
    non = t.video * (4 * int(v["freq_dim"]) + 30 * d + (lowp + 8) * latent_vals)
    non += t.text * (lowp * int(v["text_dim"]) + (6 if precision == "bf16" else 12) * d)
    if t.action:
        non += t.action * 18 * a.dim + a.chunk * (lowp + 8) * a.action_dim + 12 * a.dim
    if t.understanding:
        non += t.understanding * (12 * u.dim + lowp * u.vlm_hidden)
    ckpt_in = 4 * (t.video * d + t.action * a.dim + t.understanding * u.dim)
    shared = 4 * 6 * (t.video * d + (a.dim if t.action else 0))
    b = int(batch_size)
    return Activations(b * per, b * non, b * ckpt_in, b * shared, cfg.num_layers)


# --- the estimate ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. `total_bytes` is the peak over the step's phases plus the allowances; the component
    fields say what each holds at its own largest (see `phases` for what is alive when)."""

    preset: str
    stage: int
    batch_size: int
    zero_stage: int
    offload: bool
    world_size: int
    activation_checkpointing: bool
    precision: str
    tokens: dict[str, int]
    parameters: dict[str, int]  # per component, and 'trainable'
    trainable_weights_bytes: int
    frozen_weights_bytes: int
    frozen_weights: dict[str, int]  # vlm, vae, text_encoder, untrained experts
    master_weights_bytes: int  # DeepSpeed's own fp32 copy of the trained partition (on the device)
    gradients_bytes: int
    optimizer_states_bytes: int
    activations_bytes: int  # the mode in use
    activations_checkpointed_bytes: int
    activations_full_bytes: int
    autocast_weight_copies_bytes: int
    workspace_bytes: int  # transients of the peak phase + fixed allowance + fragmentation
    phases: dict[str, int]
    peak_phase: str
    total_bytes: int
    host_bytes: int  # CPU memory the offloaded optimizer needs
    assumptions: list[str] = field(default_factory=list)
    _inputs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["total_gib"] = round(self.total_bytes / GiB, 2)
        return d

    def settings(self) -> str:
        return (f"batch size {self.batch_size} per device, ZeRO stage {self.zero_stage}, "
                f"offload {'on' if self.offload else 'off'}, world size {self.world_size}, "
                f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}")


def estimate_training_memory(
    cfg: MotusConfig,
    *,
    stage: int,
    batch_size: int,
    zero_stage: int,
    offload: bool,
    world_size: int = 1,
    activation_checkpointing: bool = True,
    precision: str = "bf16",
    frozen_vlm: bool = True,
    pre_encoded_text: bool = True,
    instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS,
) -> MemoryEstimate:
    """Per-device memory of one training step of `cfg` at `stage` (see the module doc for the model)."""
    _check_stage(stage)
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"unknown ZeRO stage {zero_stage!r}; expected one of {list(ZERO_STAGES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; expected one of {list(PRECISIONS)}")
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be >= 1")
    if offload and zero_stage == 0:
        raise ValueError("offload (of the optimizer to the CPU) is a ZeRO feature: it needs ZeRO stage >= 1")
    inputs = dict(cfg=cfg, stage=stage, batch_size=batch_size, zero_stage=zero_stage, offload=offload,
                  world_size=world_size, activation_checkpointing=activation_checkpointing,
                  precision=precision, frozen_vlm=frozen_vlm, pre_encoded_text=pre_encoded_text,
                  instruction_tokens=instruction_tokens)
    n, z, bf16 = int(world_size), int(zero_stage), precision == "bf16"
    counts = _parameter_counts(json.dumps(cfg.to_dict(), sort_keys=True))
    experts = trained_experts(stage)
    uses_vlm = stage > 1  # Stage 1 builds no VLM (motus/train/stage.py: uses_understanding)
    p_train = sum(counts[e] for e in experts)
    groups = [counts["video"], sum(counts[e] for e in experts if e != "video")]  # the loop's two param groups
    if uses_vlm and not frozen_vlm:
        p_train += counts["vlm"]
        groups.append(counts["vlm"])
    p_frozen_experts = sum(counts[e] for e in ("video", "action", "understanding") if e not in experts)
    z3 = n if z == 3 else 1  # ZeRO-3 partitions the module's parameters (trained and frozen) over the ranks
    zs = n if z >= 1 else 1  # ZeRO >= 1 partitions the optimizer states (and its master copy)

    # weights
    trainable_w = 4 * p_train // z3
    frozen = {"vae": 4 * counts["vae"]}
    if uses_vlm and frozen_vlm:
        frozen["vlm"] = 2 * counts["vlm"]
    if not pre_encoded_text:
        frozen["text_encoder"] = 2 * text_encoder_parameters()
    if p_frozen_experts:
        frozen["untrained_experts"] = 4 * p_frozen_experts // z3
    frozen_w = sum(frozen.values())
    # DeepSpeed's fp32 master partition: ZeRO 1/2 always clone it (stage_1_and_2.py), ZeRO 3 reuses fp32
    # partitions that already live on the device (stage3.py); with offload it lives on the host.
    master = 4 * p_train // n if z in (1, 2) and not offload else 0
    optim = 0 if offload else 8 * p_train // zs
    # host with offload: master, exp_avg + exp_avg_sq, fp32 grad partition, and the step's temporary
    host = (4 + 8 + 4) * p_train // n + 4 * max(groups) // n if offload else 0
    if offload and z in (1, 2):
        host += 4 * p_train // n  # the pinned buffer stage_1_and_2 copies updated weights back through
    # gradients: ZeRO 0/1 keep a full .grad per parameter, created in the backward; ZeRO 2/3 keep a flat fp32
    # partition for the whole run (on the host with offload) plus the reduce bucket on the device
    bucket = 4 * min(DS_REDUCE_BUCKET, p_train) if z >= 2 else 0
    grads_resident = (0 if offload else 4 * p_train // n) + bucket if z >= 2 else 0
    grads_dynamic = 4 * p_train if z <= 1 else 0
    # the step: AdamW (foreach) allocates sqrt(exp_avg_sq) for a whole param group at once; ZeRO-1 flattens
    # the partition's gradients into a new fp32 tensor before the step
    step_tmp = 0 if offload else 4 * max(groups) // zs
    if z == 1 and not offload:
        step_tmp += 4 * p_train // n
    # ZeRO-3 gathers each layer's full parameters before use (no shortcut at world size 1) and prefetches
    layer_params = sum(counts[f"{e}_layer"] for e in experts)
    gather = 4 * (2 * layer_params + DS_PREFETCH_BUCKET) if z == 3 else 0

    tokens = stage_tokens(cfg, stage, instruction_tokens)
    acts = activation_bytes(cfg, stage, batch_size, precision, tokens=tokens)
    # autocast caches one bf16 copy of every trainable fp32 weight it casts until the forward's autocast
    # context exits (and without checkpointing autograd keeps them for the backward anyway)
    casts = 2 * p_train if bf16 else 0
    casts_layer = 2 * layer_params if bf16 else 0
    vlm_acts = 0
    if uses_vlm and not frozen_vlm:
        tc = cfg.vlm["text_config"]
        vlm_acts = (batch_size * 34 * int(tc["hidden_size"]) * tokens.understanding
                    * int(tc["num_hidden_layers"]))
    resident = trainable_w + frozen_w + master + optim + grads_resident
    transient = acts.per_layer  # one layer's activation gradients and temporaries in flight
    fwd_acts = acts.checkpointed if activation_checkpointing else acts.full
    # the backward's last layer: its saved tensors (kept, or recomputed) and bf16 weights are held while the
    # gradients are all but complete
    bwd = grads_dynamic + acts.non_layer + acts.per_layer + casts_layer + transient + gather
    phases = {
        "forward_end": resident + fwd_acts + vlm_acts + casts + transient + gather,
        "backward_end": resident + bwd,
        "optimizer_step": resident + grads_dynamic + step_tmp,
    }
    peak_phase = max(phases, key=phases.get)
    dynamic = phases[peak_phase] - resident
    frag = int(FRAGMENTATION * dynamic)
    total = phases[peak_phase] + FIXED_ALLOWANCE + frag
    workspace = {"forward_end": transient + gather, "backward_end": transient + gather,
                 "optimizer_step": step_tmp}[peak_phase] + FIXED_ALLOWANCE + frag

    gb = _gib
    assumptions = [
        f"parameters counted exactly on the meta device; trained this stage: {', '.join(experts)}"
        f"{' + the VLM (not frozen)' if uses_vlm and not frozen_vlm else ''} = {p_train / 1e9:.3f} B",
        "module parameters are fp32 and are the optimizer's master weights; the forward runs under bf16 "
        "autocast"
        if bf16 else "fp32 throughout: no autocast, no bf16 weight copies",
        f"frozen on the device: the Wan VAE in fp32 ({gb(frozen['vae'])})"
        + (f", the VLM in bf16 ({gb(frozen['vlm'])})" if "vlm" in frozen else
           ", no VLM (Stage 1 feeds no understanding tokens)" if not uses_vlm else "")
        + (f", the umT5-XXL encoder in bf16 ({gb(frozen['text_encoder'])})" if "text_encoder" in frozen else
           "; T5 pre-encoded (not on the device; note motus/train/stage.py as written runs T5 on the device: "
           "pass pre_encoded_text=False to count it)"),
        f"tokens per sample: video {tokens.video}, action {tokens.action}, "
        f"understanding {tokens.understanding} "
        f"(image + 2 specials + {instruction_tokens} instruction tokens), text {tokens.text}",
        "AdamW: fp32 exp_avg + exp_avg_sq (8 bytes/param); fp32 gradients (4 bytes/param)",
    ]
    zero_words = {
        0: "ZeRO 0: every rank holds all weights, gradients and optimizer states",
        1: f"ZeRO 1: optimizer states and DeepSpeed's fp32 master copy partitioned over {n} rank(s); full "
           "gradients on every rank, flattened into one more fp32 partition before the step",
        2: f"ZeRO 2: optimizer states, master copy and gradients partitioned over {n} rank(s); a "
           f"{DS_REDUCE_BUCKET:.0e}-element fp32 reduce bucket on the device",
        3: f"ZeRO 3: parameters too are partitioned over {n} rank(s) and gathered a layer at a time (no "
           "shortcut at world size 1); fp32 partitions already on the device serve as the master copy",
    }
    assumptions.append(zero_words[z])
    if offload:
        assumptions.append(
            f"offload: the fp32 master copy, AdamW states and the fp32 gradient partition live on the host "
            f"({gb(host)} of CPU memory); the module's fp32 weights stay on the device"
            + (", and ZeRO 1 still builds full gradients on the device" if z == 1 else "")
            + ". DeepSpeed refuses a torch AdamW with offload unless zero_force_ds_cpu_optimizer is false "
            "(or DeepSpeedCPUAdam is used)")
    elif z in (1, 2):
        assumptions.append("ZeRO 1/2 clone the trained partition into their own fp32 master copy even though "
                           "the module is fp32 (deepspeed/runtime/zero/stage_1_and_2.py)")
    if activation_checkpointing:
        assumptions.append("activation checkpointing: each joint layer keeps only its fp32 residual inputs; "
                           "the layer being recomputed holds its full activations during its backward")
    else:
        assumptions.append("no checkpointing: every joint layer keeps its norm outputs, fp32 AdaLN tables, "
                           "bf16 linear inputs, FFN hiddens and attention q/k/v/out until its backward")
    if bf16:
        assumptions.append(f"bf16 autocast caches a bf16 copy of every trained weight until the forward ends "
                           f"({gb(casts)}): checkpointing does not remove it")
    assumptions += [
        "activation bytes per token were read off autograd's saved tensors on the CPU autocast path; CUDA's "
        "flash attention and fused kernels keep slightly different sets: an estimate, not a measurement",
        f"AdamW (foreach) allocates one fp32 temporary the size of its largest parameter group in the step "
        f"({gb(4 * max(groups) // zs)}{', on the host' if offload else ''})",
        f"allowance: {gb(FIXED_ALLOWANCE)} for the CUDA context and library workspaces, "
        f"{int(FRAGMENTATION * 100)} % of the per-step memory for allocator fragmentation; the frozen VLM, "
        "VAE and T5 forwards run before the MoT forward and are assumed to fit in its peak",
    ]
    if uses_vlm and not frozen_vlm:
        assumptions.append("VLM not frozen: the trainer cannot do this (FrozenVLM); its activations use the "
                           "generic 34 x hidden bytes per token per layer rule")

    params = {k: counts[k] for k in ("video", "action", "understanding", "vlm", "vae")}
    params["trainable"] = p_train
    return MemoryEstimate(
        preset=cfg.preset, stage=int(stage), batch_size=int(batch_size), zero_stage=z, offload=bool(offload),
        world_size=n, activation_checkpointing=bool(activation_checkpointing), precision=precision,
        tokens=dataclasses.asdict(tokens), parameters=params,
        trainable_weights_bytes=trainable_w, frozen_weights_bytes=frozen_w, frozen_weights=frozen,
        master_weights_bytes=master, gradients_bytes=grads_resident + grads_dynamic,
        optimizer_states_bytes=optim,
        activations_bytes=fwd_acts + vlm_acts, activations_checkpointed_bytes=acts.checkpointed + vlm_acts,
        activations_full_bytes=acts.full + vlm_acts, autocast_weight_copies_bytes=casts,
        workspace_bytes=workspace, phases=phases, peak_phase=peak_phase, total_bytes=total, host_bytes=host,
        assumptions=assumptions, _inputs=inputs,
    )


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


# --- does it fit? ----------------------------------------------------------------------------------------
def _candidates(inp: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Single changes to try, cheapest in throughput first."""
    out: list[tuple[str, dict[str, Any]]] = []
    z, b, n = inp["zero_stage"], inp["batch_size"], inp["world_size"]
    if not inp["activation_checkpointing"]:
        out.append(("--activation-checkpointing", dict(activation_checkpointing=True)))
    if n > 1 and z < 3:
        out.append((f"--zero-stage {z + 1}", dict(zero_stage=z + 1)))
    if not inp["offload"]:
        zz = max(z, 2)
        out.append((f"--zero-stage {zz} --offload", dict(zero_stage=zz, offload=True)))
    elif z < 2:
        out.append(("--zero-stage 2 --offload", dict(zero_stage=2)))
    if b > 1:
        out.append((f"--batch-size {b // 2} (gradient accumulation keeps the global batch)",
                    dict(batch_size=b // 2)))
    out.append((f"--world-size {2 * n} --zero-stage 3", dict(world_size=2 * n, zero_stage=3)))
    return out


def suggest(estimate: MemoryEstimate, device_bytes: int) -> str:
    """The first single change (in the order above) that fits; else the one that comes closest."""
    inp = estimate._inputs
    if not inp:
        return "a smaller batch size, ZeRO offload or more devices"
    tried = []
    for label, change in _candidates(inp):
        est = estimate_training_memory(**{**inp, **change})
        if est.total_bytes <= device_bytes:
            return f"{label} (estimated {_gib(est.total_bytes)})"
        tried.append((est.total_bytes, label))
    best = min(tried)
    return f"{best[1]} comes closest ({_gib(best[0])}) but does not fit either: combine it with more devices"


def check_fits(estimate: MemoryEstimate, device_bytes: int) -> None:
    """Raise ValueError (settings, estimated vs available, what to try next) when the estimate exceeds it."""
    if estimate.total_bytes <= device_bytes:
        return
    raise ValueError(
        f"{estimate.preset} Stage {estimate.stage} does not fit: {estimate.settings()} needs an estimated "
        f"{_gib(estimate.total_bytes)} per device (peak at the {estimate.peak_phase.replace('_', ' ')}), "
        f"{_gib(device_bytes)} available. Try {suggest(estimate, device_bytes)}.")
