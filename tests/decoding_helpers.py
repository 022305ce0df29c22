"""Steppers and model configs for decoding tests that run `InterleavedGenerator` without (or beside)
its own KV-cache stepper, shared by the generation and image-format tests.

- `padded_config` / `RandomStepper`: no model at all; random logits over PADDED vocabulary rows
  (a `bias` makes image starts, or anything else, likely) drive the generator's state machine;
- `FullForwardStepper`: decoding without a cache, independent of ours: the model's own `forward`.
"""

import torch

PADDED = 640
"""Padded vocabulary rows of `padded_config` (what `RandomStepper` returns logits for)."""


def padded_config(vocab_size, seq_length=96):
    """A single-stack model config of 96 positions and PADDED vocabulary rows (what the generator reads)."""
    from megatron_jam.models.config import JamGPTConfig, ParentConfig

    return JamGPTConfig(parent=ParentConfig(max_position_embeddings=96), vocab_size=vocab_size, seq_length=seq_length,
                        make_vocab_size_divisible_by=PADDED)


class RandomStepper:
    """Random logits for every row; `bias` makes image starts (and anything else) likely."""

    def __init__(self, seed, bias):
        self.g, self.bias = torch.Generator().manual_seed(seed), bias

    def step(self, slots, cache, start, n):
        return torch.randn(slots.batch, PADDED, generator=self.g) * 3 + self.bias


class FullForwardStepper:
    """Decoding without a cache, independent of ours: the model's own `forward` on each row's valid
    tokens (no padding), positions 0..n-1, last position's logits."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def step(self, slots, cache, start, n):
        end, out = start + n, []
        for r in range(slots.batch):
            toks = slots.tokens[r, :end][slots.valid[r, :end]]
            if not slots.valid[r, end - 1]:
                out.append(torch.zeros(self.model.cfg.padded_vocab_size))
                continue
            out.append(self.model(toks[None], torch.arange(len(toks))[None])[0, -1].float())
        return torch.stack(out)
