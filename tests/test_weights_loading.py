"""Pretrained weights come from local folders in the layouts the real releases use; nothing is downloaded."""

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import Qwen3VLConfig, Qwen3VLModel

from motus.model import MotusModel, tiny


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A Wan2.2-TI2V-5B-Diffusers-shaped pipeline root (transformer/, vae/) and a Qwen3-VL folder."""
    root = tmp_path_factory.mktemp("weights")
    cfg = tiny()
    torch.manual_seed(123)
    wan = WanTransformer3DModel(**cfg.video)
    wan.save_pretrained(root / "wan" / "transformer")
    vae = AutoencoderKLWan(**dict(cfg.vae, latents_mean=[0.5] * 8, latents_std=[2.0] * 8))
    vae.save_pretrained(root / "wan" / "vae")
    vlm = Qwen3VLModel(Qwen3VLConfig(**cfg.vlm))
    vlm.save_pretrained(root / "qwen")
    return root, wan, vae, vlm


def test_local_weights_are_loaded_into_every_component(weights):
    root, wan, vae, vlm = weights
    cfg = tiny()
    cfg.weights = {"video": str(root / "wan"), "vae": str(root / "wan"), "vlm": str(root / "qwen")}
    m = MotusModel(cfg)
    for name, p in wan.state_dict().items():
        torch.testing.assert_close(m.video.transformer.state_dict()[name], p, msg=name)
    for name, p in vlm.state_dict().items():
        torch.testing.assert_close(m.vlm.model.state_dict()[name].float(), p.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(m.vae.mean.flatten(), torch.full((8,), 0.5))  # the VAE's own latent statistics
    assert not any(p.requires_grad for p in m.vlm.parameters())


def test_checkpoint_of_model_with_local_weights_does_not_copy_frozen_parts(weights, tmp_path):
    root, *_ = weights
    cfg = tiny()
    cfg.weights = {"video": str(root / "wan"), "vae": str(root / "wan"), "vlm": str(root / "qwen")}
    m = MotusModel(cfg)
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "motus_config.json"]
    again = MotusModel.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(again.vlm.model.state_dict()["language_model.embed_tokens.weight"],
                               m.vlm.model.state_dict()["language_model.embed_tokens.weight"])
