"""Precision is configuration (the bf16 path runs on this CPU), and a sample's output never depends on its batch."""

import pytest
import torch

from motus.config import ConfigError, validate_params
from motus.data.loader import window_spec_from_params
from motus.model import MotusModel, build_config, tiny
from motus.model.text import FrozenTextEncoder
from motus.model.vlm import FrozenVAE, FrozenVLM
from motus.train.inputs import window_inputs
from motus.train.precision import PrecisionError, autocast, check_resume, resolve

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ the setting
def test_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    assert resolve("auto", CPU) == "fp32"
    assert resolve(None, CPU) == "fp32"
    assert resolve("auto", torch.device("cuda", 0)) == "bf16"  # resolving does not touch the device
    assert resolve("fp32", CPU) == "fp32"
    assert resolve("bf16", CPU, supported=True) == "bf16"
    assert resolve("bf16", CPU) == "bf16"  # every CPU: natively (AVX512-BF16, AMX) or widened to fp32 and rounded


def test_unknown_or_unsupported_precision_is_a_named_error():
    with pytest.raises(PrecisionError, match=r"--precision: 'fp16' is not a precision; allowed: auto, bf16, fp32"):
        resolve("fp16", CPU, source="--precision")
    with pytest.raises(PrecisionError, match=r"stages.stage3.precision: bf16 was requested but this cpu device "
                                             r"has no bf16 support.*Never a silent fallback"):
        resolve("bf16", CPU, source="stages.stage3.precision", supported=False)
    with pytest.raises(ConfigError, match=r"stages.s.precision"):
        validate_params({"stages": {"s": {"stage": 1, "tiers": {}, "trains": ["video"], "action_source": "none",
                                          "steps": 1, "batch_size": 1, "lr": 1e-4, "registered_model": "m",
                                          "precision": "fp16"}}})
    with pytest.raises(ConfigError, match=r"precision"):
        validate_params({"precision": "half"})


def test_resume_with_another_precision_names_both():
    check_resume("bf16", "bf16", "ckpt")
    check_resume(None, "fp32", "ckpt")  # written before precision was recorded
    with pytest.raises(PrecisionError, match=r"ckpt was written with precision bf16; this job runs fp32"):
        check_resume("bf16", "fp32", "ckpt")


# ---------------------------------------------------------------------------------------- bf16 on CPU
def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(video_latents=torch.randn(b, *cfg.latent_shape, generator=g),
                text_embeds=torch.randn(b, 7, cfg.video["text_dim"], generator=g),
                actions=torch.randn(b, cfg.action.chunk, cfg.action.action_dim, generator=g),
                state=torch.randn(b, cfg.action.state_dim, generator=g))


def test_bf16_autocast_trains_fp32_master_weights_with_fp32_time_embeddings_and_losses():
    torch.manual_seed(0)
    model = MotusModel(tiny(), with_vlm=False, with_vae=False)
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, name=name: seen.update({name: o.dtype}) and None)
             for name, m in (("video_time", model.video.transformer.condition_embedder.time_embedder),
                             ("action_time", model.action.time_embedding),
                             ("ffn", model.action.blocks[0].ffn.up))]
    with autocast("bf16", CPU):
        out = model.training_loss(**_batch(model.config), generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    assert seen == {"video_time": torch.float32, "action_time": torch.float32, "ffn": torch.bfloat16}
    assert out["loss"].dtype == out["video_loss"].dtype == out["action_loss"].dtype == torch.float32
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # same inputs in fp32: bf16 changes the numbers a little, not the meaning
    with torch.no_grad():
        ref = model.training_loss(**_batch(model.config), generator=torch.Generator().manual_seed(1))
    assert float(out["loss"]) == pytest.approx(float(ref["loss"]), rel=0.05)


# ----------------------------------------------------------------------------------- batch independence
@pytest.fixture(scope="module")
def frozen():
    cfg = tiny()
    torch.manual_seed(0)
    model = MotusModel(cfg, with_vlm=False, with_vae=False).eval()
    with torch.no_grad():  # a trained-looking action head: a zero head would hide any dependence
        model.action.decoder.head.weight.normal_(std=0.1)
    vae, vlm = FrozenVAE(cfg.vae), FrozenVLM(cfg.vlm)
    text = FrozenTextEncoder(cfg.video["text_dim"], max_len=cfg.text_len, seed=2)
    return cfg, model, vae, vlm, text


def _window_batch(cfg, instructions, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(instructions)
    return {"video": torch.rand(b, 3, cfg.num_frames, cfg.height, cfg.width, generator=g) * 2 - 1,
            "actions": torch.randn(b, cfg.action.chunk, cfg.action.action_dim, generator=g),
            "state": torch.randn(b, cfg.action.state_dim, generator=g), "instruction": instructions}


def _rows(batch, i):
    return {k: (v[i:i + 1] if torch.is_tensor(v) else v[i:i + 1]) for k, v in batch.items()}


def test_a_sample_is_the_same_alone_and_batched_with_a_longer_instruction(frozen):
    cfg, model, vae, vlm, text = frozen
    short, long = "insert the peg", "transfer the cube from the right arm to the left arm, slowly and carefully"
    batch = _window_batch(cfg, [short, long])
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    with torch.no_grad():
        both = window_inputs(batch, cfg=cfg, vae=vae, text=text, vlm=vlm, with_actions=True, device=CPU)
        alone = window_inputs(_rows(batch, 0), cfg=cfg, vae=vae, text=text, vlm=vlm, with_actions=True, device=CPU)
        assert both["text_embeds"].shape[1] == alone["text_embeds"].shape[1] == cfg.text_len
        assert both["understanding"].mask[0].sum() < both["understanding"].mask.shape[1]  # the VLM tokens are padded
        loss_both = model.training_loss(**both, generator=gens(11, 12), reduction="none")
        loss_alone = model.training_loss(**alone, generator=gens(11), reduction="none")
        for key in ("loss", "video_loss", "action_loss"):
            assert loss_both[key].shape == (2,)
            torch.testing.assert_close(loss_both[key][:1], loss_alone[key], rtol=1e-5, atol=1e-5)
        act_both = model.sample("vla", both["video_latents"], both["text_embeds"], state=both["state"],
                                understanding=both["understanding"], generator=gens(5, 6)).actions
        act_alone = model.sample("vla", alone["video_latents"], alone["text_embeds"], state=alone["state"],
                                 understanding=alone["understanding"], generator=gens(5)).actions
    torch.testing.assert_close(act_both[:1], act_alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(act_both[0], act_both[1])  # the other sample really is different


def test_text_longer_than_text_len_is_refused_and_long_instructions_are_cut_with_a_warning(frozen, caplog):
    cfg, model, *_ = frozen
    b = _batch(cfg, b=1)
    with pytest.raises(ValueError, match=f"more than the model's text_len={cfg.text_len}"):
        model.training_loss(**dict(b, text_embeds=torch.randn(1, cfg.text_len + 1, cfg.video["text_dim"])))
    enc = FrozenTextEncoder(cfg.video["text_dim"], max_len=8)
    with caplog.at_level("WARNING"):
        out = enc(["a sentence longer than eight bytes"])
    assert out.shape == (1, 8, cfg.video["text_dim"]) and "cut to the model's text_len=8" in caplog.text


# --------------------------------------------------------------------------------------------- geometry
def test_named_geometries_set_frames_chunk_ratio_and_downsample():
    params = validate_params({"model": {"preset": "tiny", "geometry": "ac-one"}})
    from motus.model.presets import config_from_params

    cfg = config_from_params(params.model)
    assert (cfg.geometry, cfg.num_frames, cfg.latent_frames, cfg.action.chunk, cfg.video_action_ratio,
            cfg.downsample, cfg.height, cfg.width) == ("ac-one", 9, 3, 48, 6, 1, 384, 320)
    spec = window_spec_from_params(params.data.window, cfg)
    assert (spec.chunk, spec.video_action_ratio, spec.downsample) == (48, 6, 1)
    # an explicit window downsample wins over the geometry's
    spec = window_spec_from_params(validate_params({"data": {"window": {"downsample": 2}}}).data.window, cfg)
    assert spec.downsample == 2
    with pytest.raises(ConfigError, match=r"model.geometry"):
        validate_params({"model": {"geometry": "robotwin2"}})
    with pytest.raises(ConfigError, match=r"model.num_video_frames.*8 is not 1 \+ 4k frames"):
        validate_params({"model": {"num_video_frames": 8}})
    with pytest.raises(ValueError, match=r"num_frames=8 must be 1 \+ 4\*k"):
        build_config("tiny", {"num_frames": 8})


def test_the_command_line_wins_then_the_job_section_then_the_global_key():
    from motus.train.precision import setting_for

    params = validate_params({"precision": "fp32", "latent_action": {"precision": "bf16"}})
    assert setting_for(params, params.latent_action, None, "latent_action") == ("bf16", "latent_action.precision")
    assert setting_for(params, params.latent_action, "fp32", "latent_action") == ("fp32", "--precision")
    params = validate_params({"precision": "bf16"})
    assert setting_for(params, params.latent_action, None, "latent_action") == ("bf16", "precision")
