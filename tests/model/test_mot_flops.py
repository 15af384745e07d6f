"""benchmarks/mot_flops.py against torch's own FLOP counter on the real MotusModel.

Tolerance: none. The analytic count covers exactly the op classes FlopCounterMode counts (mm/addmm/bmm,
convolution, scaled-dot-product attention) with the same formulas (2*m*n*k; 2 * outputs * kernel * c_in; 4 *
s_q * s_k * d per head), so any difference is a real miscount. Attention runs on SDPA's math backend here: on
the CPU, the default flash kernel (`_scaled_dot_product_flash_attention_for_cpu`) is not in FlopCounterMode's
table and would be counted as 0; the math backend runs the same two products as bmm.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from motus.model import MotusModel, build_config
from motus.model.vlm import UnderstandingContext

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "mot_flops.py"


def _load():
    spec = importlib.util.spec_from_file_location("mot_flops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mot_flops"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


mf = _load()


def _stage_model(preset, stage):
    cfg = build_config(preset, {"action": {"encoder_mode": mf.encoder_mode_for(stage) or "finetune"}})
    torch.manual_seed(0)
    model = MotusModel(cfg, with_vlm=False, with_vae=False)
    model.set_trainable(["video"] if stage == 1 else ["video", "action", "understanding"])
    return cfg, model


def _inputs(cfg, stage, b, instruction_tokens=32):
    """The stage's token set: Stage 1 feeds video only; the understanding length is the analytic estimate."""
    g = torch.Generator().manual_seed(b)
    t = mf.stage_tokens(cfg, stage, instruction_tokens)
    out = dict(video_latents=torch.randn(b, *cfg.latent_shape, generator=g),
               text_embeds=torch.randn(b, cfg.text_len, cfg.video["text_dim"], generator=g),
               actions=None, state=None, understanding=None)
    if stage > 1:
        out["actions"] = torch.randn(b, cfg.action.chunk, cfg.action.action_dim, generator=g)
        feats = torch.randn(b, t.understanding, cfg.understanding.vlm_hidden, generator=g)
        out["understanding"] = UnderstandingContext(feats, torch.ones(b, t.understanding, dtype=torch.bool))
    if stage == 3:
        out["state"] = torch.randn(b, cfg.action.state_dim, generator=g)
    return out


def _count(fn):
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_forward_flops_equal_flop_counter(preset, stage):
    cfg, model = _stage_model(preset, stage)
    for b in (1, 2, 5):
        x = _inputs(cfg, stage, b)
        t_video = torch.rand(b, cfg.latent_frames)
        t_action = torch.rand(b) if stage > 1 else None
        args = (x["video_latents"], t_video, x["text_embeds"], x["actions"], t_action, x["state"],
                x["understanding"])
        with torch.no_grad():
            measured = _count(lambda a=args: model(*a))
        analytic = mf.mot_forward_flops(cfg, b, stage)
        assert analytic["total"] == measured, (preset, stage, b, analytic, measured)
        assert analytic["total"] == sum(analytic[e] for e in mf.EXPERTS)
        if stage == 1:
            assert analytic["action"] == analytic["understanding"] == 0


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_training_step_flops_equal_flop_counter(preset, stage):
    cfg, model = _stage_model(preset, stage)
    model.train()
    b = 2
    x = _inputs(cfg, stage, b)
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        measured = _count(lambda: model.training_loss(**x)["loss"].backward())
        exact = mf.exact_training_step_flops(cfg, b, stage, activation_checkpointing=ckpt)
        assert exact["total"] == measured, (preset, stage, ckpt)
        # the 3x / 4x convention is an upper bound of what runs
        convention = mf.training_step_flops(cfg, b, stage, activation_checkpointing=ckpt)
        assert convention["total"] == (4 if ckpt else 3) * mf.mot_forward_flops(cfg, b, stage)["total"]
        assert convention["total"] >= exact["total"]


def test_full_preset_convention_is_within_one_percent_of_exact():
    cfg = build_config("full")
    for stage in (1, 2, 3):
        for ckpt in (False, True):
            conv = mf.training_step_flops(cfg, 1, stage, ckpt)["total"]
            exact = mf.exact_training_step_flops(cfg, 1, stage, ckpt)["total"]
            assert 0 <= conv - exact < 0.01 * exact


def test_understanding_token_estimate_is_what_the_vlm_processor_builds():
    cfg = build_config("tiny")
    torch.manual_seed(0)
    model = MotusModel(cfg, with_vae=False)
    images = torch.rand(2, 3, 64, 64)
    for n in (1, 7, 32):  # the tiny VLM tokenizes bytes: an n-character ASCII instruction is n tokens
        ctx = model.encode_understanding(images, ["x" * n, "y" * n])
        assert ctx.features.shape[1] == mf.understanding_tokens(cfg, n)
    assert mf.vlm_image_tokens(build_config("full")) == (384 // 32) ** 2


def test_vlm_forward_flops_equal_flop_counter():
    cfg = build_config("tiny")
    torch.manual_seed(0)
    model = MotusModel(cfg, with_vae=False)
    for b in (1, 3):
        inputs = model.vlm.prepare(torch.rand(b, 3, 64, 64), ["z" * 20] * b, cfg.vlm_image_size)
        with torch.no_grad():
            measured = _count(lambda i=inputs: model.vlm.model(**i, use_cache=False))
        assert mf.vlm_forward_flops(cfg, b, 20)["total"] == measured


def test_full_preset_tokens_per_stage():
    full = build_config("full")
    assert [tuple(vars(mf.stage_tokens(full, s)).values()) for s in (1, 2, 3)] == [
        (360, 0, 0, 512), (360, 16, 178, 512), (360, 21, 178, 512)]


def test_script_prints_every_stage():
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "full"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for stage in (1, 2, 3):
        assert f"stage{stage}: tokens video 360" in r.stdout
    assert "frozen VLM forward" in r.stdout
