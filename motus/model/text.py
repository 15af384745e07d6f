"""The text encoder that conditions the video expert (Wan 2.2 uses umT5-XXL, frozen).

`full`: transformers' `UMT5EncoderModel` + tokenizer from a local path (weights.text), never downloaded.
`tiny`: a frozen, seeded byte-embedding stand-in with the same interface, so the whole pipeline runs here.
Either way the output is [B, L, text_dim] with positions past each instruction zeroed, as Wan pads T5.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .vlm import _Frozen, _require_dir

log = logging.getLogger(__name__)


class FrozenTextEncoder(_Frozen):
    def __init__(self, text_dim: int, weights: str | None = None, max_len: int = 512, seed: int = 0):
        super().__init__()
        self.text_dim, self.max_len, self.weights = text_dim, max_len, weights
        self.tokenizer = None
        self._warned: set[str] = set()
        if weights:
            from transformers import AutoTokenizer, UMT5EncoderModel

            path = _require_dir(weights, "weights.text", "a umT5 encoder folder (config.json + safetensors + tokenizer)")
            self.model = UMT5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=torch.bfloat16)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            if self.model.config.d_model != text_dim:
                raise ValueError(f"weights.text: encoder width {self.model.config.d_model} != video text_dim {text_dim}")
        else:
            g = torch.Generator().manual_seed(seed)
            self.model = nn.Embedding(257, text_dim)
            with torch.no_grad():
                self.model.weight.copy_(torch.randn(257, text_dim, generator=g))
        self._freeze()

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        """[B, max_len, text_dim]: every instruction padded to the same fixed length (zeros past its end), so an
        instruction's context never depends on the longest instruction in its batch."""
        device = next(self.model.parameters()).device
        if self.tokenizer is not None:
            self._warn_cut(texts, [len(i) for i in self.tokenizer(texts)["input_ids"]])
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len,
                                 return_tensors="pt")
            out = self.model(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))
            return (out.last_hidden_state * tok.attention_mask.to(device)[..., None]).float()
        ids = [list(t.encode("utf-8")) or [256] for t in texts]
        self._warn_cut(texts, [len(i) for i in ids])
        batch = torch.zeros(len(ids), self.max_len, dtype=torch.long, device=device)
        mask = torch.zeros(len(ids), self.max_len, 1, device=device)
        for row, seq in enumerate(ids):
            seq = seq[: self.max_len]
            batch[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return self.model(batch) * mask

    def _warn_cut(self, texts: list[str], lengths: list[int]) -> None:
        for text, n in zip(texts, lengths, strict=True):
            if n > self.max_len and text not in self._warned:
                self._warned.add(text)
                log.warning("instruction of %d tokens cut to the model's text_len=%d: %r", n, self.max_len, text)
