"""Pretrained weights come from local folders in the layouts the real releases use; nothing is downloaded."""

import shutil

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


QWEN_TEMPLATE = (  # the shape of Qwen3-VL's template: one turn per message, an image as vision markers + a pad
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
)


def test_real_vlm_weights_get_the_chat_templated_prompt_and_batch_independent_features(weights, tmp_path):
    """A Qwen3-VL folder with a tokenizer and chat template: the understanding expert's input is the templated
    user turn with the image placeholder expanded to the image's merged patches, as Qwen3-VL's processor does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from motus.model.vlm import FrozenVLM

    root, *_ = weights
    cfg = tiny()
    specials = {"<|image_pad|>": 500, "<|video_pad|>": 501, "<|vision_start|>": 502, "<|vision_end|>": 503,
                "<|im_start|>": 504, "<|im_end|>": 505, "<|endoftext|>": 506}
    words = ["[UNK]", "user", "insert", "the", "peg", "into", "socket", "transfer", "cube"]
    tok = Tokenizer(models.WordLevel({**{w: i for i, w in enumerate(words)}, **specials}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                            additional_special_tokens=list(specials)).save_pretrained(root / "qwen")
    (root / "qwen" / "chat_template.jinja").write_text(QWEN_TEMPLATE)

    vlm = FrozenVLM(cfg.vlm, str(root / "qwen"))
    n = 4  # a 64x64 image: (64 / 16)^2 patches, merged 2x2
    ids = vlm.prompt_ids("insert the peg", n)
    assert ids == [504, 1, 502, *[500] * n, 503, 2, 3, 4, 505]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    both = vlm.encode(vlm.prepare(images, ["insert the peg", "transfer the cube into the socket"], 64))
    alone = vlm.encode(vlm.prepare(images[:1], ["insert the peg"], 64))
    k = int(alone.mask.sum())
    assert k == len(ids) and int(both.mask[0].sum()) == k < both.mask.shape[1]
    torch.testing.assert_close(both.features[0, :k].float(), alone.features[0, :k].float(), atol=2e-2, rtol=2e-2)

    shutil.copytree(root / "qwen", tmp_path / "qwen")
    (tmp_path / "qwen" / "chat_template.jinja").write_text("{{ messages[0]['content'][1]['text'] }}")
    with pytest.raises(ValueError, match="rendered 0 image placeholders"):
        FrozenVLM(cfg.vlm, str(tmp_path / "qwen")).prompt_ids("insert the peg", n)
