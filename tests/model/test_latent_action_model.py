"""The latent-action VAE: shapes, overfitting, masked action loss, KL, full preset on meta, save/load, errors."""

from __future__ import annotations

import pytest
import torch

from motus.model.latent_action import (
    LatentActionConfig,
    LatentActionVAE,
    build_latent_action_config,
    full,
    kl_standard_normal,
    tiny,
)


def synthetic_flow(b: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth affine flow fields (u, v) rendered as RGB in [-1, 1]: r=u, g=v, b=-(u+v)/2."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.rand(b, 2, 3, generator=g) * 2 - 1  # per sample: u, v = c0 + c1 * x + c2 * y
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    uv = coef[..., 0, None, None] + coef[..., 1, None, None] * xs + coef[..., 2, None, None] * ys
    uv = torch.tanh(uv)
    return torch.cat([uv, -(uv[:, :1] + uv[:, 1:]) / 2], dim=1)


@pytest.fixture
def model() -> LatentActionVAE:
    torch.manual_seed(0)
    return LatentActionVAE(tiny())


def test_tiny_shapes(model):
    cfg = model.config
    assert (cfg.num_tokens, cfg.token_dim, cfg.latent_dim) == (4, 16, 14)
    x = synthetic_flow(3)
    mu, logvar, tokens = model.encode(x)
    assert mu.shape == logvar.shape == (3, 14)
    assert tokens.shape == (3, 4, 16)
    assert model.decode(mu).shape == (3, 3, 16, 16)
    out = model(x, torch.randn(3, 14), generator=torch.Generator().manual_seed(0))
    for k in ("loss", "recon_loss", "action_loss", "kl"):
        assert out[k].shape == () and torch.isfinite(out[k])
    assert out["z"].shape == out["mu"].shape == (3, 14)
    assert out["recon"].shape == x.shape
    assert model.latent(x).shape == (3, 14) and not model.latent(x).requires_grad


def test_train_samples_eval_is_deterministic(model):
    x = synthetic_flow(2)
    model.train()
    a = model(x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a["z"], a["mu"])
    model.eval()
    b = model(x)
    assert torch.equal(b["z"], b["mu"])


def test_tiny_overfits_small_batch():
    torch.manual_seed(0)
    m = LatentActionVAE(tiny())
    x = synthetic_flow(8, seed=1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    m.eval()
    with torch.no_grad():
        before = m(x)["recon_loss"].item()
    m.train()
    for _ in range(300):
        loss = m(x, generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        after = m(x)["recon_loss"].item()
    print(f"tiny recon loss {before:.4f} -> {after:.5f} ({before / after:.1f}x)")
    assert after * 5 <= before


def test_action_loss_uses_only_labelled_rows(model):
    model.eval()
    x = synthetic_flow(4)
    actions = torch.randn(4, 14)
    none = torch.zeros(4, dtype=torch.bool)
    out = model(x, actions, none)
    assert out["action_loss"].item() == 0.0
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["recon_loss"] + model.config.beta_kl * out["kl"])

    mask = torch.tensor([True, False, True, False])
    a = model(x, actions, mask)
    changed = actions.clone()
    changed[1] = 100.0
    changed[3] = float("nan")  # unlabelled rows may hold anything
    b = model(x, changed, mask)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["action_loss"], b["action_loss"])
    # mean over the labelled rows only: sum of squared errors / 2
    mu = a["mu"]
    expected = ((mu[mask] - actions[mask]) ** 2).sum(-1).mean()
    assert torch.allclose(a["action_loss"], expected)
    b["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # no mask = every row labelled; no actions = zero
    full_mask = model(x, actions)["action_loss"]
    assert torch.allclose(full_mask, ((mu - actions) ** 2).sum(-1).mean())
    assert model(x)["action_loss"].item() == 0.0


def test_kl_zero_at_standard_normal():
    z = torch.zeros(5, 14)
    assert kl_standard_normal(z, z).item() == 0.0
    assert kl_standard_normal(torch.ones(5, 14), z).item() == pytest.approx(7.0)  # 0.5 * 14 per row


def test_full_preset_on_meta():
    cfg = full()
    assert (cfg.image_size, cfg.num_tokens, cfg.token_dim, cfg.hidden) == (64, 4, 512, 1024)
    assert cfg.spatial_compression == 32
    with torch.device("meta"):
        m = LatentActionVAE(cfg)
        mu, _, tokens = m.encode(torch.empty(2, 3, 64, 64))
        recon = m.decode(mu)
    assert tokens.shape == (2, 4, 512) and recon.shape == (2, 3, 64, 64)
    n = m.num_parameters()
    print("full latent-action VAE parameters:", n)
    assert 320e6 < n["total"] < 335e6  # 327.4M: DC-AE 321.1M + MLPs 6.3M


def test_missing_weights_folder_named(tmp_path):
    missing = tmp_path / "no-dcae-here"
    with pytest.raises(FileNotFoundError, match="no-dcae-here"):
        LatentActionVAE(build_latent_action_config("tiny", {"weights": str(missing)}))
    with pytest.raises(FileNotFoundError, match="no-dcae-here"):
        LatentActionVAE(tiny(), weights=str(missing))


def test_pretrained_dcae_folder_is_loaded(tmp_path):
    from diffusers import AutoencoderDC

    torch.manual_seed(1)
    dcae = AutoencoderDC(**tiny().dcae)
    dcae.save_pretrained(tmp_path / "dcae")
    m = LatentActionVAE(tiny(), weights=str(tmp_path / "dcae"))
    assert torch.equal(m.dcae.encoder.conv_in.weight, dcae.encoder.conv_in.weight)
    assert m.config.weights == str(tmp_path / "dcae")


def test_save_load_round_trip(model, tmp_path):
    model.eval()
    x = synthetic_flow(3)
    d = model.save_pretrained(tmp_path / "lam")
    loaded = LatentActionVAE.from_pretrained(d).eval()
    assert loaded.config == model.config
    a, b = model(x), loaded(x)
    for k in ("loss", "mu", "logvar", "recon"):
        assert torch.equal(a[k], b[k])


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="latent_action_config.json"):
        LatentActionVAE.from_pretrained(tmp_path)


def test_bad_shapes_named(model):
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        model.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        model(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 14\]"):
        model.decode(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"\[B=2, 14\]"):
        model(synthetic_flow(2), torch.zeros(3, 14))
    with pytest.raises(ValueError, match=r"bool tensor \[B=2\]"):
        model(synthetic_flow(2), torch.zeros(2, 14), torch.ones(2))


def test_config_validation_and_overrides():
    cfg = build_latent_action_config("tiny", {"hidden": 32, "beta_kl": 0.0})
    assert cfg.hidden == 32 and cfg.beta_kl == 0.0
    assert LatentActionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_tokens=9 must equal"):
        build_latent_action_config("tiny", {"num_tokens": 9})
    with pytest.raises(ValueError, match="token_dim=8 must equal dcae.latent_channels=16"):
        build_latent_action_config("tiny", {"token_dim": 8})
    with pytest.raises(ValueError, match="multiple of the DC-AE spatial compression 8"):
        build_latent_action_config("tiny", {"image_size": 20})
    with pytest.raises(ValueError, match="unknown latent-action override"):
        build_latent_action_config("tiny", {"tokens": 4})
    with pytest.raises(ValueError, match="unknown latent-action preset"):
        build_latent_action_config("huge")
    bigger = build_latent_action_config("tiny", {"image_size": 32, "num_tokens": 16})
    assert bigger.grid == 4
    derived = build_latent_action_config("tiny", {"image_size": 32, "dcae": {"latent_channels": 8}})
    assert (derived.num_tokens, derived.token_dim) == (16, 8)
    assert LatentActionVAE(derived).encode(synthetic_flow(1, size=32))[2].shape == (1, 16, 8)
