"""Logit processing for mixed-modal decoding: classifier-free guidance, vocabulary masks, sampling.

Paper section 3.1: temperature sampling with top-p (nucleus) sampling, and
classifier-free guidance for image tokens (eq. 6)::

    logits_cfg = logits_uncond + alpha * (logits_cond - logits_uncond)

Kept as pure functions on tensors so the tests can check them on known logits.
Temperature 0 means greedy (argmax; ties go to the lowest id, torch's rule).
Disallowed ids get -inf *before* temperature and top-p, so they can never be
drawn and never take probability mass from the nucleus.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_jam.data.vocab import VocabLayout


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to draw tokens; text and image tokens have their own temperature and top-p."""

    temperature: float = 1.0
    """Text tokens (and `<break>` / `<eos>`); 0 = greedy."""
    top_p: float = 1.0
    """Nucleus of text tokens (1 = no truncation)."""
    image_temperature: float = 1.0
    """Image tokens; 0 = greedy."""
    image_top_p: float = 1.0
    """Nucleus of image tokens (the paper: 0.8 to 1)."""
    cfg_scale: float = 1.0
    """alpha of eq. 6 for image tokens (the paper: 3.5 to 4); 1 = no guidance (no unconditional rows)."""
    seed: int = 0
    """Seed of the sampling generator: a run is repeatable."""

    def __post_init__(self):
        for name in ("temperature", "image_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("top_p", "image_top_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")

    @classmethod
    def greedy(cls, cfg_scale: float = 1.0) -> "SamplingParams":
        return cls(temperature=0.0, image_temperature=0.0, cfg_scale=cfg_scale)


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Eq. 6: `uncond + scale * (cond - uncond)` (elementwise, any shape)."""
    return uncond + scale * (cond - uncond)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of ids whose probability reaches `top_p` (per row); others -> -inf.

    The most likely id is always kept, so a row never becomes empty.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before this id already >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One id per row of `logits` `[b, V]` (disallowed ids already -inf)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(top_p_filter(logits / temperature, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class VocabMasks:
    """Boolean masks `[V_padded]` of the ids each decoding mode may produce (True = allowed)."""

    def __init__(self, layout: VocabLayout, padded_vocab_size: int):
        v = padded_vocab_size
        ids = torch.arange(v)
        self.layout = layout
        self.text = torch.from_numpy(layout.is_text(ids.numpy()))
        self.text[layout.eos_id] = False  # `<eos>` may be a sentencepiece id; it has its own switch
        self.image = torch.from_numpy(layout.is_image(ids.numpy()))
        self.break_ = ids == layout.break_id
        self.eos = ids == layout.eos_id

    def text_mode(self, allow_break: bool, allow_eos: bool = True) -> Tensor:
        """Text ids, plus `<eos>` and `<break>` when allowed."""
        mask = self.text.clone()
        if allow_eos:
            mask |= self.eos
        if allow_break:
            mask |= self.break_
        return mask


def restrict(logits: Tensor, allowed: Tensor) -> Tensor:
    """Disallowed ids -> -inf (`allowed` broadcasts against `logits`)."""
    return logits.masked_fill(~allowed, float("-inf"))
