"""Contracts of the Motus network (tiny preset on CPU; full preset wiring on the meta device)."""

import copy

import pytest
import torch

from motus.model import MODES, MotusModel, build_config, full, tiny
from motus.model.presets import FlowConfig
from motus.model.rectified_flow import inference_schedule, sample_timesteps, shift_time


def make_batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        video_latents=torch.randn(b, *cfg.latent_shape, generator=g),
        text_embeds=torch.randn(b, 5, cfg.video["text_dim"], generator=g),
        actions=torch.randn(b, cfg.action.chunk, cfg.action.action_dim, generator=g),
        state=torch.randn(b, cfg.action.state_dim, generator=g),
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MotusModel(tiny()).eval()


@pytest.fixture(scope="module")
def understanding(model):
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model.encode_understanding(imgs, ["pick up the red cube", "insert the peg"])


def _perturb_heads(model):
    """A fresh model has a zero action head (zero velocity); give it weights so sampling moves actions."""
    with torch.no_grad():
        model.action.decoder.head.weight.normal_(std=0.1)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_keeps_clean_inputs_and_changes_only_generated(mode, understanding):
    torch.manual_seed(0)
    m = MotusModel(tiny()).eval()
    _perturb_heads(m)
    batch = make_batch(m.config)
    before = copy.deepcopy(batch)
    g = torch.Generator().manual_seed(3)
    res = m.sample(mode, understanding=understanding, generator=g, steps=3, **batch)
    spec = MODES[mode]
    for k in batch:  # inputs are never modified in place
        assert torch.equal(batch[k], before[k]), k
    assert res.generated == tuple(k for k, r in (("video", spec.video), ("action", spec.action)) if r == "generate")
    # the observation frame is always returned untouched
    if res.video_latents is not None:
        assert torch.equal(res.video_latents[:, :, 0], batch["video_latents"][:, :, 0])
    if spec.video == "clean":
        assert torch.equal(res.video_latents, batch["video_latents"])
    elif spec.video == "generate":
        assert res.video_latents.shape == batch["video_latents"].shape
        assert not torch.allclose(res.video_latents[:, :, 1:], batch["video_latents"][:, :, 1:])
        assert torch.isfinite(res.video_latents).all()
    else:
        assert res.video_latents is None
    if spec.action == "clean":
        assert torch.equal(res.actions, batch["actions"])
    elif spec.action == "generate":
        # integrated from the same noise the sampler drew: it must have moved away from it
        g2 = torch.Generator().manual_seed(3)
        if spec.video != "clean":
            torch.randn((2, *m.config.latent_shape[:1], m.config.latent_shape[1] - 1, *m.config.latent_shape[2:]), generator=g2)
        start = torch.randn(res.actions.shape, generator=g2)
        assert not torch.allclose(res.actions, start)
        assert torch.isfinite(res.actions).all()
    else:
        assert res.actions is None


def test_generated_modality_depends_on_clean_condition(model, understanding):
    """WM: different given actions -> different predicted video (the condition is actually used)."""
    _perturb_heads(model)
    b = make_batch(model.config)
    r1 = model.sample("wm", understanding=understanding, generator=torch.Generator().manual_seed(0), **b)
    b2 = dict(b, actions=b["actions"] + 1.0)
    r2 = model.sample("wm", understanding=understanding, generator=torch.Generator().manual_seed(0), **b2)
    assert not torch.allclose(r1.video_latents, r2.video_latents)


def test_x0_estimate_is_one_deterministic_step_from_the_noise_mean(model, understanding):
    """estimate_x0 = 0 - v(0, t=1): no draw (any generator gives the same), and exactly what the forward pass says."""
    _perturb_heads(model)
    b = make_batch(model.config)
    cond = dict(video_latents=b["video_latents"], text_embeds=b["text_embeds"], state=b["state"],
                understanding=understanding)
    one = model.estimate_x0("vla", **cond, generator=torch.Generator().manual_seed(1))
    two = model.estimate_x0("vla", **cond, generator=torch.Generator().manual_seed(2))
    assert torch.equal(one.actions, two.actions) and one.steps == 1
    zeros = torch.zeros_like(b["actions"])
    video = b["video_latents"].clone()
    video[:, :, 1:] = 0
    t_frames = torch.cat([torch.zeros(2, 1), torch.ones(2, video.shape[2] - 1)], dim=1)
    with torch.no_grad():
        vel = model.forward(video, t_frames, b["text_embeds"], zeros, torch.ones(2), b["state"], understanding)
    assert torch.allclose(one.actions, -vel.action, atol=1e-6)
    sampled = model.sample("vla", **cond, generator=torch.Generator().manual_seed(1), steps=1)
    assert not torch.allclose(sampled.actions, one.actions)  # a draw starts elsewhere
    with pytest.raises(ValueError, match="start must be 'noise' or 'mean'"):
        model.sample("vla", **cond, start="zero")


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = MotusModel(tiny(), with_vlm=False, with_vae=False).train()
    batch = make_batch(m.config)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        # the same t and noise every step: this is literally one fixed batch
        out = m.training_loss(generator=torch.Generator().manual_seed(7), **batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad or p.grad is not None]


def test_gradients_reach_action_expert_when_video_frozen_and_not_the_reverse(understanding):
    torch.manual_seed(0)
    m = MotusModel(tiny(), with_vae=False)
    batch = make_batch(m.config)

    m.set_trainable(["action", "understanding"])
    m.training_loss(understanding=understanding, **batch)["loss"].backward()
    assert all(p.grad is None for p in m.video.parameters())
    assert all(p.grad is None for p in m.vlm.parameters())
    a_grads = [p.grad for p in m.action.parameters()]
    assert all(g is not None for g in a_grads)
    assert sum(g.abs().sum().item() for g in a_grads) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.understanding.parameters())

    m.zero_grad(set_to_none=True)
    m.set_trainable(["video"])
    m.training_loss(understanding=understanding, **batch)["loss"].backward()
    assert all(p.grad is None for p in m.action.parameters())
    assert all(p.grad is None for p in m.understanding.parameters())
    assert sum(p.grad.abs().sum().item() for p in m.video.parameters() if p.grad is not None) > 0


def test_vlm_padding_does_not_change_any_non_pad_output(model):
    cfg = model.config
    _perturb_heads(model)
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    short, long = "grasp", "pick up the red cube and place it into the blue bowl on the left"
    alone = model.encode_understanding(imgs[:1], [short])
    both = model.encode_understanding(imgs, [short, long])
    n = alone.features.shape[1]
    assert both.mask[0].sum() == n and both.features.shape[1] > n  # sample 0 is padded in the batch
    # the VLM itself: real tokens identical with and without padding
    torch.testing.assert_close(both.features[0, :n], alone.features[0], rtol=1e-5, atol=1e-5)

    b = make_batch(cfg, b=2)
    t_frames = torch.full((2, cfg.latent_frames), 0.5)
    t_frames[:, 0] = 0
    t_a = torch.full((2,), 0.3)
    args = (b["video_latents"], t_frames, b["text_embeds"], b["actions"], t_a, b["state"])
    with torch.no_grad():
        v_alone = model(*(x[:1] for x in args), understanding=alone)
        v_both = model(*args, understanding=both)
        torch.testing.assert_close(v_both.video[:1], v_alone.video, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v_both.action[:1], v_alone.action, rtol=1e-5, atol=1e-5)
        # negative control: attending to the pad tokens does change the output
        leaky = type(both)(both.features, torch.ones_like(both.mask))
        v_leaky = model(*args, understanding=leaky)
        assert not torch.allclose(v_leaky.action[:1], v_alone.action, atol=1e-5)


def _train_losses(seed, steps=5):
    torch.manual_seed(seed)
    m = MotusModel(tiny(), with_vlm=False, with_vae=False).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    batch = make_batch(m.config, seed=seed)
    losses = []
    for _ in range(steps):
        loss = m.training_loss(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_two_seeded_runs_give_identical_losses():
    a, b = _train_losses(11), _train_losses(11)
    assert a == b
    assert _train_losses(12) != a


def test_video_loss_excludes_the_conditioning_frame():
    """The loss equals MSE over future frames only: the official code averages the zeroed
    conditioning frame into the denominator, which shrinks the loss by F/(F-1)."""
    torch.manual_seed(0)
    m = MotusModel(tiny(), with_vlm=False, with_vae=False)
    m.config.flow.action_loss_weight = 0.0
    b = make_batch(m.config)
    out = m.training_loss(b["video_latents"], b["text_embeds"], generator=torch.Generator().manual_seed(5))
    # replay the same draws by hand
    g = torch.Generator().manual_seed(5)
    t_v = sample_timesteps(m.config.flow, 2, g)
    sample_timesteps(m.config.flow, 2, g)  # t_action (drawn, unused)
    eps = torch.randn(b["video_latents"].shape, generator=g)
    x0 = b["video_latents"]
    tt = t_v.view(-1, 1, 1, 1, 1)
    noisy = torch.cat([x0[:, :, :1], (1 - tt) * x0[:, :, 1:] + tt * eps[:, :, 1:]], dim=2)
    t_frames = torch.cat([torch.zeros(2, 1), t_v[:, None].expand(2, x0.shape[2] - 1)], dim=1)
    with torch.no_grad():
        vel = m(noisy, t_frames, b["text_embeds"]).video
    err = (vel[:, :, 1:] - (eps[:, :, 1:] - x0[:, :, 1:])) ** 2
    torch.testing.assert_close(out["video_loss"].detach(), err.sum() / err.numel())
    torch.testing.assert_close(out["t_video"], t_v)


def test_timestep_samplers_and_schedule():
    fc = FlowConfig()
    t = sample_timesteps(fc, 4096, torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 1
    assert t.mean() > 0.7  # shift 5 pushes mass toward noise
    fc.timestep_sampler = "logit_normal"
    t = sample_timesteps(fc, 4096, torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 0.5) < 0.02
    s = inference_schedule(4, 1.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert shift_time(torch.tensor(0.5), 5.0).item() == pytest.approx(5 / 6)
    fc.timestep_sampler = "cosine"
    with pytest.raises(ValueError, match="uniform_shift"):
        sample_timesteps(fc, 2)


def test_full_preset_parameter_counts_on_meta():
    with torch.device("meta"):
        m = MotusModel(full())
    c = m.parameter_counts()
    assert c["action"] == pytest.approx(641.5e6, rel=2e-4)
    assert c["understanding"] == pytest.approx(253.5e6, rel=2e-4)
    assert c["video"] == pytest.approx(5.000e9, rel=1e-4)
    assert c["vae"] == pytest.approx(704.7e6, rel=1e-4)
    assert c["vlm"] == pytest.approx(2.128e9, rel=1e-3)
    # the official RoboTwin geometry: 1 + 8 frames at 384x320 -> 3 latent frames, 16 actions, 2 per future frame
    assert m.config.latent_shape == (48, 3, 24, 20)
    assert (m.config.num_frames, m.config.action.chunk, m.config.video_action_ratio, m.config.downsample) == (9, 16, 2, 3)
    assert m.config.text_len == 512
    assert len(m.action.blocks) == len(m.understanding.blocks) == len(m.video.blocks) == 30


def test_full_preset_shapes_on_meta():
    cfg = full()
    with torch.device("meta"):
        m = MotusModel(cfg, with_vlm=False, with_vae=False)
        b = {k: v.to("meta") for k, v in make_batch(cfg, b=1).items()}
        t_frames = torch.zeros(1, cfg.latent_frames)
        vel = m(b["video_latents"], t_frames, b["text_embeds"], b["actions"], torch.zeros(1), b["state"])
    assert vel.video.shape == (1, *cfg.latent_shape)
    assert vel.action.shape == (1, 16, 14)


def test_pretrain_encoder_mode_has_no_state_or_registers():
    cfg = build_config("tiny", {"action": {"encoder_mode": "pretrain"}})
    m = MotusModel(cfg, with_vlm=False, with_vae=False)
    assert m.action.encoder.registers is None and m.action.encoder.state_in is None
    b = make_batch(cfg)
    out = m.training_loss(b["video_latents"], b["text_embeds"], actions=b["actions"])
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="pretrain mode"):
        m.training_loss(**b)


def test_decoder_starts_at_zero():
    m = MotusModel(tiny(), with_vlm=False, with_vae=False)
    assert m.action.decoder.head.weight.abs().sum() == 0 and m.action.decoder.head.bias.abs().sum() == 0


def test_bad_inputs_name_the_expected_value(model):
    b = make_batch(model.config)
    with pytest.raises(ValueError, match=r"action_dim=14"):
        model.training_loss(**dict(b, actions=torch.randn(2, 8, 7)))
    with pytest.raises(ValueError, match=r"\[B, 8, F>=2, 4, 4\]"):
        model.training_loss(**dict(b, video_latents=torch.randn(2, 8, 3, 8, 8)))
    with pytest.raises(ValueError, match="unknown mode 'policy'.*vla"):
        model.sample("policy", **b)
    with pytest.raises(ValueError, match="state_dim=14"):
        model.training_loss(**dict(b, state=None))
    with pytest.raises(ValueError, match="text_dim=32"):
        model.training_loss(**dict(b, text_embeds=torch.randn(2, 5, 31)))
    with pytest.raises(ValueError, match="conditions on actions"):
        model.sample("wm", **dict(b, actions=None))
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_config("huge")
    with pytest.raises(ValueError, match="unknown model override 'action.widht'"):
        build_config("tiny", {"action": {"widht": 3}})
    with pytest.raises(ValueError, match="must equal video.num_layers=2"):
        build_config("tiny", {"action": {"num_layers": 3}})


def test_missing_weights_path_is_a_clear_error(tmp_path):
    cfg = tiny()
    cfg.weights = {"video": None, "vae": None, "vlm": str(tmp_path / "nope")}
    with pytest.raises(FileNotFoundError, match=r"weights.vlm: .*nope' does not exist.*never downloaded"):
        MotusModel(cfg)


def test_save_and_load_roundtrip(tmp_path, model, understanding):
    _perturb_heads(model)
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"motus_config.json", "model.safetensors",
                                                            "vlm.safetensors", "vae.safetensors"}
    again = MotusModel.from_pretrained(tmp_path / "m").eval()
    b = make_batch(model.config)
    r1 = model.sample("joint", understanding=understanding, generator=torch.Generator().manual_seed(0), **b)
    r2 = again.sample("joint", understanding=understanding, generator=torch.Generator().manual_seed(0), **b)
    torch.testing.assert_close(r1.actions, r2.actions)
    torch.testing.assert_close(r1.video_latents, r2.video_latents)
    with pytest.raises(FileNotFoundError, match="not a Motus model folder"):
        MotusModel.from_pretrained(tmp_path)


def test_sampling_embeds_text_once_and_never_reruns_the_vlm(model, understanding):
    calls = {"text": 0, "vlm": 0}
    h1 = model.video.transformer.condition_embedder.text_embedder.register_forward_hook(
        lambda *a: calls.__setitem__("text", calls["text"] + 1))
    h2 = model.vlm.model.register_forward_hook(lambda *a: calls.__setitem__("vlm", calls["vlm"] + 1))
    try:
        model.sample("joint", understanding=understanding, steps=4, **make_batch(model.config))
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"text": 1, "vlm": 0}


def test_vae_roundtrip_shapes(model):
    frames = torch.rand(1, 3, model.config.num_frames, 64, 64) * 2 - 1
    lat = model.vae.encode(frames)
    assert lat.shape == (1, *model.config.latent_shape)
    assert model.vae.decode(lat).shape == frames.shape


def test_frozen_parts_stay_frozen_in_train_mode(model):
    model.train()
    try:
        assert not model.vlm.training and not model.vae.training
        assert not any(p.requires_grad for p in model.vlm.parameters())
    finally:
        model.eval()


def test_activation_checkpointing_gives_the_same_loss_and_gradients(understanding):
    torch.manual_seed(0)
    m = MotusModel(tiny(), with_vae=False).train()
    _perturb_heads(m)
    batch = make_batch(m.config)

    def loss_and_grads():
        m.zero_grad(set_to_none=True)
        loss = m.training_loss(understanding=understanding, generator=torch.Generator().manual_seed(2), **batch)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.action.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    m.gradient_checkpointing = True
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for a, b in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_training_loss_at_a_fixed_t_is_the_rectified_flow_loss_at_that_t():
    """Validation asks the model for its loss at fixed t: x_t = (1-t) x0 + t eps, target eps - x0, clean first frame."""
    from motus.model.rectified_flow import add_noise

    torch.manual_seed(0)
    m = MotusModel(tiny(), with_vlm=False, with_vae=False).eval()
    b = make_batch(m.config)
    with torch.no_grad():
        out = m.training_loss(generator=torch.Generator().manual_seed(3), t=0.5, **b)
        g = torch.Generator().manual_seed(3)
        x0, a = b["video_latents"], b["actions"]
        eps_v = torch.randn(x0.shape, generator=g)
        eps_a = torch.randn(a.shape, generator=g)
        half = torch.full((x0.shape[0],), 0.5)
        noisy = torch.cat([x0[:, :, :1], add_noise(x0[:, :, 1:], eps_v[:, :, 1:], half)], dim=2)
        t_frames = torch.cat([torch.zeros(x0.shape[0], 1), half[:, None].expand(-1, x0.shape[2] - 1)], dim=1)
        vel = m(noisy, t_frames, b["text_embeds"], add_noise(a, eps_a, half), half, b.get("state"), None)
    assert torch.equal(out["t_video"], half) and torch.equal(out["t_action"], half)
    assert out["video_loss"].item() == pytest.approx(((vel.video[:, :, 1:] - (eps_v - x0)[:, :, 1:]) ** 2).mean().item())
    assert out["action_loss"].item() == pytest.approx(((vel.action - (eps_a - a)) ** 2).mean().item())
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\], got 1.5"):
        m.training_loss(t=1.5, **b)
