"""The frozen VLM (Qwen3-VL) that feeds the understanding expert, and the Wan 2.2 VAE.

Both are frozen: they run without gradients, stay in eval mode, and are never handed to the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


@dataclass
class UnderstandingContext:
    """VLM last-layer hidden states and their padding mask (True = real token). Computed once per call."""

    features: torch.Tensor  # [B, L, vlm_hidden]
    mask: torch.Tensor  # [B, L] bool

    def to(self, device) -> UnderstandingContext:
        return UnderstandingContext(self.features.to(device), self.mask.to(device))


class _Frozen(nn.Module):
    """Keeps a sub-model in eval mode and out of autograd whatever the parent does."""

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: ARG002 - frozen modules never train
        return super().train(False)


class FrozenVLM(_Frozen):
    def __init__(self, vlm_config: dict, weights: str | None = None):
        super().__init__()
        from transformers import Qwen3VLConfig, Qwen3VLModel

        if weights:
            path = _require_dir(weights, "weights.vlm", "a Qwen3-VL folder (config.json + *.safetensors)")
            self.model = Qwen3VLModel.from_pretrained(str(path), local_files_only=True, dtype=torch.bfloat16)
        else:
            self.model = Qwen3VLModel(Qwen3VLConfig(**vlm_config))
        self.weights = weights
        self.config = self.model.config
        self._tokenizer = None
        self._freeze()

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    # --- inputs -------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """The real tokenizer when weights are local; a byte-level stand-in for the random tiny VLM."""
        if self.weights:
            return self._load_tokenizer()(text, add_special_tokens=False)["input_ids"]
        vocab = self.config.text_config.vocab_size
        reserved = min(self.config.image_token_id, self.config.vision_start_token_id)
        return [1 + (b % (min(vocab, reserved) - 1)) for b in text.encode("utf-8")]

    def prompt_ids(self, text: str, image_tokens: int) -> list[int]:
        """The VLM's token ids for one image + instruction.

        Real weights: the Qwen3-VL chat template (the weights folder's `chat_template.jinja` /
        `chat_template.json`, else the tokenizer's) renders a user turn holding the image and the instruction,
        and the image placeholder is expanded to the image's merged patch count, as Qwen3-VL's processor does
        (its fast image processor needs torchvision, which GPU nodes often lack; the PIL one feeds the pixels).
        The random tiny VLM: vision markers, image tokens, then the byte-level instruction."""
        if not self.weights:
            c = self.config
            return [c.vision_start_token_id, *[c.image_token_id] * image_tokens, c.vision_end_token_id,
                    *self.tokenize(text)]
        tok = self._load_tokenizer()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = tok.apply_chat_template(messages, chat_template=self._chat_template(), tokenize=False,
                                         add_generation_prompt=False)
        pad = tok.convert_ids_to_tokens(self.config.image_token_id)
        if prompt.count(pad) != 1:
            raise ValueError(f"weights.vlm: the chat template rendered {prompt.count(pad)} image placeholders "
                             f"('{pad}') for one image; expected exactly one")
        return tok(prompt.replace(pad, pad * image_tokens), add_special_tokens=False)["input_ids"]

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.weights, local_files_only=True)
        return self._tokenizer

    def _chat_template(self) -> str:
        root = Path(self.weights)
        if (root / "chat_template.jinja").exists():
            return (root / "chat_template.jinja").read_text()
        if (root / "chat_template.json").exists():
            import json

            return json.loads((root / "chat_template.json").read_text())["chat_template"]
        template = getattr(self._load_tokenizer(), "chat_template", None)
        if not template:
            raise FileNotFoundError(f"weights.vlm: '{root}' has no chat template (chat_template.jinja, "
                                    f"chat_template.json or the tokenizer's); a Qwen3-VL release ships one")
        return template

    def prepare(self, images: torch.Tensor, instructions: list[str], image_size: int) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] (uint8 or float in [0, 1]) + one instruction each -> right-padded VLM inputs."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VLM images must be [B, 3, H, W], got {tuple(images.shape)}")
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        vc = self.config.vision_config
        px = image_size * image_size
        proc = Qwen2VLImageProcessorPil(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                        temporal_patch_size=vc.temporal_patch_size, min_pixels=px, max_pixels=px)
        arr = images.detach().cpu()
        if arr.dtype != torch.uint8:
            arr = (arr.clamp(0, 1) * 255).round().to(torch.uint8)
        batch = proc(images=[np.ascontiguousarray(a.permute(1, 2, 0).numpy()) for a in arr], return_tensors="pt")
        merge = vc.spatial_merge_size**2
        seqs = [self.prompt_ids(text, int(grid.prod()) // merge)
                for grid, text in zip(batch["image_grid_thw"], instructions, strict=True)]
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {
            "input_ids": input_ids, "attention_mask": mask,
            "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"],
            "mm_token_type_ids": (input_ids == self.config.image_token_id).long(),
        }

    @torch.no_grad()
    def encode(self, inputs: dict[str, torch.Tensor]) -> UnderstandingContext:
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model(**inputs, use_cache=False)
        return UnderstandingContext(out.last_hidden_state, inputs["attention_mask"].bool())


class FrozenVAE(_Frozen):
    """Wan 2.2 VAE: frames in [-1, 1] [B, 3, F, H, W] <-> normalised latents [B, z, 1 + (F-1)/4, H/16, W/16]."""

    def __init__(self, vae_config: dict, weights: str | None = None):
        super().__init__()
        from diffusers import AutoencoderKLWan

        if weights:
            path = _require_dir(weights, "weights.vae", "a diffusers AutoencoderKLWan folder (or a pipeline root with vae/)")
            sub = "vae" if (path / "vae" / "config.json").exists() else None
            self.model = AutoencoderKLWan.from_pretrained(str(path), subfolder=sub, local_files_only=True)
        else:
            self.model = AutoencoderKLWan(**vae_config)
        c = self.model.config
        self.register_buffer("mean", torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.latents_std).view(1, -1, 1, 1, 1), persistent=False)
        self._freeze()

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        mu = self.model.encode(frames.to(self.model.dtype)).latent_dist.mode()
        return ((mu - self.mean.to(mu)) / self.std.to(mu)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.std.to(latents) + self.mean.to(latents)
        return self.model.decode(z.to(self.model.dtype)).sample.clamp(-1, 1).float()


def _require_dir(path: str, key: str, expected: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{key}: '{p}' does not exist; expected {expected}. Weights are never downloaded.")
    return p
